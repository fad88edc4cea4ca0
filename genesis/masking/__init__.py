"""Connective masking as a batched device op: `ConnectiveMasker`, its tables, the torch path and the dispatcher.

    masker = ConnectiveMasker.from_tokenizer(tokenizer, strategy="structural")
    out = masker(input_ids, step=step, verse_start=None)     # (B, T) ids on any device
    logits = model(out.input_ids)                            # targets stay as they are

    control = ConnectiveMasker.control(tokenizer, {"strategy": "random"}, train_tokens, seq_len=256)  # the control arm

The op and its wrapper live apart, one concern per module:

    tables.py      MaskTables, build_tables, compile_prob_table, resolve_lexicon: what every path reads
    philox.py      Philox-4x32-10 and its uniforms in numpy and torch, the twin of the kernel's draws
    torch_path.py  mask_torch: the sparse (CPU) and dense layouts, the readout targets
    dispatch.py    triton_status, choose_impl: the Triton kernel or the torch path, per device
    masker.py      MaskOutput, ConnectiveMasker: construction, validation, the call, the counts
    report.py      what a masker says about itself (report, chain statistics, describe)
    errors.py      MaskingError, TritonUnavailableError

`mask_torch` and the Triton kernel in `genesis.kernels.mask` implement the same semantics bit for bit. Schedules
and the adaptive rule are in `genesis.curriculum`, `clause_length` in `genesis.lexicon` (both re-exported here).
Semantics: docs/masking.md.
"""

from genesis.curriculum import count_first_pieces
from genesis.lexicon import clause_length
from genesis.masking.dispatch import IMPLS, choose_impl, requested_impl, triton_status
from genesis.masking.errors import MaskingError, TritonUnavailableError
from genesis.masking.masker import ConnectiveMasker, MaskOutput, logger
from genesis.masking.philox import MASK32, philox4x32, uniform_from_bits, uniform_from_bits_numpy
from genesis.masking.tables import (
    SCAN_START,
    SCAN_STOP,
    MaskTables,
    build_tables,
    compile_prob_table,
    connectives_of,
    resolve_lexicon,
)
from genesis.masking.torch_path import mask_torch, readout_position, readout_reference

__all__ = [
    "IMPLS", "MASK32", "SCAN_START", "SCAN_STOP", "ConnectiveMasker", "MaskOutput", "MaskTables", "MaskingError",
    "TritonUnavailableError", "build_tables", "choose_impl", "clause_length", "compile_prob_table", "connectives_of",
    "count_first_pieces", "logger", "mask_torch", "philox4x32", "readout_position", "readout_reference",
    "requested_impl", "resolve_lexicon", "triton_status", "uniform_from_bits", "uniform_from_bits_numpy",
]
