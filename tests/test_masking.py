"""The connective masker: Triton kernel == torch path (exactly), both == the lexicon oracle, the rules, the rates,
the random keys, bad input and dispatch.

Kernel tests run the real Triton kernel: under TRITON_INTERPRET=1 on the CPU (set by conftest.py on machines
without CUDA), compiled on a GPU where there is one (the `cuda` tests at the end)."""

import dataclasses
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from genesis.config import MaskingConfig, build, to_dict
from genesis.lexicon import CLASSES, DEFAULT_CONNECTIVES, find_matches
from genesis.masking import (
    ConnectiveMasker,
    MaskingError,
    MaskOutput,
    choose_impl,
    clause_length,
    mask_torch,
    philox4x32,
    readout_position,
    readout_reference,
    uniform_from_bits,
)

from .helpers import ROOT

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernel = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                  reason="needs TRITON_INTERPRET=1 or a CUDA GPU")
# tests whose kernel half runs only where the kernel can run; their torch half runs everywhere
KERNEL_RUNS = INTERPRET or torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# where the kernel tests run it: the interpreter takes CPU tensors, the compiled kernel CUDA ones
KERNEL_DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"

STRATEGIES = {
    "uniform": dict(strategy="uniform", mask_prob=0.7),
    "weighted": dict(strategy="weighted", base_probability=0.9),
    "structural": dict(strategy="structural"),
    "structural_weighted": dict(strategy="structural", structural_weights=True),
}
REPLACEMENTS = {"mask": dict(replacement="mask"), "bert": dict(replacement="bert", bert_split=[0.4, 0.4, 0.2])}


def make_masker(tokenizer, seed=1234, **overrides):
    return ConnectiveMasker.from_tokenizer(tokenizer, seed=seed, log=None, **overrides)


def variant(base, **overrides):
    """A masker with `base`'s resolved lexicon and other masking settings: resolving the lexicon again would take
    ~0.5 s per masker, which the many small kernel cases below cannot afford. Only settings that leave the lexicon
    alone (not connectives or punctuation) may be overridden."""
    cfg = build(MaskingConfig, {**to_dict(base.config), **overrides}, "masking")
    return ConnectiveMasker(base.lexicon, cfg, base.mask_id, seed=base.seed, rank=base.rank, log=None)


def kernel(masker, x, step, verse_start=None, row_offset=0, block=64, tables=None):
    """The Triton kernel on KERNEL_DEVICE (inputs already there keep their strides); outputs on x's device. Both
    kernel versions run and must agree exactly: version 2 with the smallest window its halo allows (128 tokens for
    lookback 12 or 30), so that rows span several of its programs too; with readout, version 1's readout pass walks
    `block` columns at a time, version 2's the default. `tables` replaces the masker's (CPU)
    tables."""
    from genesis.kernels.experimental.mask_v2 import connective_mask_triton_v2, window_geometry
    from genesis.kernels.mask import connective_mask_triton

    home = x.device
    x = x.to(KERNEL_DEVICE)
    verse_start = None if verse_start is None else verse_start.to(KERNEL_DEVICE)
    tables = masker.tables(x.device) if tables is None else tables.to(x.device)
    args = (x, verse_start, tables, masker.seed, step, masker.rank, row_offset)
    out = connective_mask_triton(*args, block=block, readout_block=block)  # version 2 walks 256 columns: both vary
    try:
        window = window_geometry(tables, 128)[0]
    except ValueError:  # a long lookback: the default window
        window = None
    assert_same(connective_mask_triton_v2(*args, window=window), out, "kernel version 2 vs 1")
    return tuple(t.to(home) for t in out)


def torch_path(masker, x, step, verse_start=None, row_offset=0):
    """The torch path as x's device runs it; on the CPU also the dense layout (what GPUs without Triton run), which
    must agree exactly, so every comparison with the kernel below covers both layouts."""
    result = mask_torch(x, verse_start, masker.tables(x.device), masker.seed, step, masker.rank, row_offset)
    if x.device.type == "cpu":
        dense = mask_torch(x, verse_start, masker.tables(x.device), masker.seed, step, masker.rank, row_offset,
                           layout="dense")
        assert_same(dense, result, "dense layout vs sparse")
    return result


def assert_same(a, b, case=""):
    names = ("input_ids", "mask", "classes", "connectives", "matched", "readout", "readout_start")
    # a MaskOutput without readout holds None in its readout fields where the paths return five tensors
    a, b = (tuple(t for t in outputs if t is not None) for outputs in (a, b))
    assert len(a) == len(b) and len(a) in (4, 5, 7), f"{case}: {len(a)} vs {len(b)} outputs"  # 7: with readout
    for name, u, v in zip(names, a, b):
        assert u.dtype == v.dtype and u.shape == v.shape, f"{case}: {name} {u.dtype}{tuple(u.shape)} vs {v.dtype}" \
            f"{tuple(v.shape)}"
        assert torch.equal(u, v), f"{case}: {name} differs at {torch.nonzero(u != v)[:5].tolist()}"


@pytest.fixture(scope="module")
def tok(kjv_tokenizer):
    return kjv_tokenizer


@pytest.fixture(scope="module")
def base_masker(tok):
    """The default masker; `variant` derives the others from it without resolving the lexicon again."""
    return make_masker(tok)


@pytest.fixture(scope="module")
def kjv_rows(kjv_corpus):
    """The whole training split as rows of 1024 tokens, with verse_start flags."""
    data = kjv_corpus.splits["train"]
    n = len(data) // 1024 * 1024
    x = torch.from_numpy(np.asarray(data.tokens[:n]).astype(np.int64)).view(-1, 1024)
    vs = torch.from_numpy(np.asarray(data.verse_start[:n]).astype(bool)).view(-1, 1024)
    return x, vs


def adversarial_batch(masker, shape, seed=0):
    """Rows built from whole lexicon patterns, punctuation, newlines, gluing tokens and random ids, so that matches,
    near-misses (a pattern followed by a gluing token), word edges and block edges are all frequent."""
    lex = masker.lexicon
    patterns = [lex.pattern_ids(i) for i in range(lex.num_patterns)]
    punct = np.flatnonzero(lex.clause_boundary | lex.verse_separator)
    glue = np.flatnonzero(lex.glue_left & lex.word_end)
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(shape[0]):
        row: list[int] = []
        while len(row) < shape[1]:
            kind = rng.random()
            if kind < 0.4:
                row += patterns[rng.integers(len(patterns))]
            elif kind < 0.6:
                row.append(int(rng.choice(punct)))
            elif kind < 0.8:
                row.append(int(rng.choice(glue)))
            else:
                row.append(int(rng.integers(lex.vocab_size)))
        rows.append(row[: shape[1]])
    return torch.tensor(rows, dtype=torch.int64).view(shape)


# ----------------------------------------------------------------------------------------------------------------
# Philox


@needs_kernel
def test_philox_is_bit_exact_with_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def draw(out_ptr, rand_ptr, seed, c1, c2, c3, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = offs < N
        zero = tl.zeros([BLOCK], dtype=tl.int64)
        a, b, c, d = tl.philox(seed, offs.to(tl.uint32), (zero + c1).to(tl.uint32), (zero + c2).to(tl.uint32),
                               (zero + c3).to(tl.uint32))
        tl.store(out_ptr + offs * 4 + 0, a.to(tl.int64), mask=keep)
        tl.store(out_ptr + offs * 4 + 1, b.to(tl.int64), mask=keep)
        tl.store(out_ptr + offs * 4 + 2, c.to(tl.int64), mask=keep)
        tl.store(out_ptr + offs * 4 + 3, d.to(tl.int64), mask=keep)
        tl.store(rand_ptr + offs, tl.rand(seed, offs), mask=keep)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 20_000
    for seed, c1, c2, c3 in [(0, 0, 0, 0), (1234, 7, 99, 3), (2**40 + 17, 2**32 - 1, 123456, 2**31 + 5)]:
        words = torch.empty(n * 4, dtype=torch.int64, device=device)
        rand = torch.empty(n, dtype=torch.float32, device=device)
        draw[(triton.cdiv(n, 1024),)](words, rand, seed, c1, c2, c3, n, BLOCK=1024)
        c0 = torch.arange(n, device=device)
        full = lambda v: torch.full((n,), v, dtype=torch.int64, device=device)  # noqa: E731
        ours = torch.stack(philox4x32(seed, c0, full(c1), full(c2), full(c3)), 1)
        assert torch.equal(ours, words.view(n, 4)), seed
        if c1 == c2 == c3 == 0:  # tl.rand is Philox with counter (offset, 0, 0, 0)
            assert torch.equal(uniform_from_bits(ours[:, 0]), rand)


def test_philox_numpy_and_torch_rounds_agree():
    """The CPU runs the rounds in numpy, CUDA in torch: the two must agree bit for bit."""
    from genesis.masking.philox import _philox_numpy, _philox_torch

    g = torch.Generator().manual_seed(0)
    counters = [torch.randint(0, 2**32, (5000,), generator=g) for _ in range(4)]
    for seed in (0, 1234, 2**63 - 1):
        via_torch = _philox_torch(seed, *counters)
        via_numpy = _philox_numpy(seed, *(c.numpy() for c in counters))
        for t, n in zip(via_torch, via_numpy):
            assert torch.equal(t, torch.from_numpy(n.astype("int64")))


def test_philox_known_answer():
    """Independent of Triton: the first words for seed 0, counter (0..1, 0, 0, 0) (checked against tl.philox)."""
    c = torch.arange(2)
    z = torch.zeros(2, dtype=torch.int64)
    words = torch.stack(philox4x32(0, c, z, z, z), 1).tolist()
    assert words == [[1713891541, 3781805453, 3159862348, 2600524760], [4175744164, 1555169499, 2980410603, 159317863]]
    u = uniform_from_bits(torch.tensor([0, 2**31 - 1, 2**31, 2**32 - 1]))
    assert u.tolist() == [0.0, pytest.approx(1.0, abs=1e-6), pytest.approx(1.0, abs=1e-6), 0.0]
    assert u.dtype == torch.float32 and (u < 1.0).all()


# ----------------------------------------------------------------------------------------------------------------
# Kernel == torch path, exactly


@needs_kernel
@pytest.mark.parametrize("replacement", list(REPLACEMENTS))
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_kernel_equals_torch_on_kjv_batches(tok, kjv_rows, strategy, replacement):
    masker = make_masker(tok, **STRATEGIES[strategy], **REPLACEMENTS[replacement])
    x, vs = kjv_rows
    x, vs = x[3:5, 100:400].contiguous(), vs[3:5, 100:400].contiguous()  # T=300: not a multiple of the block
    for verse_start in (vs, None):
        expected = torch_path(masker, x, 17, verse_start)
        assert expected[1].any()
        assert_same(kernel(masker, x, 17, verse_start, block=128), expected)


# denser structural rules for the small kernel batches (the default ones, x weights, mask too few connectives there),
# still with one probability per (verse_initial, clause_len) cell kind
DENSE_RULES = [dict(p=0.95, verse_initial=True, clause_len_gt=4), dict(p=0.7, verse_initial=True),
               dict(p=0.85, clause_len_gt=6), dict(p=0.6)]


def dense(strategy):
    """STRATEGIES[strategy], with DENSE_RULES for the structural ones."""
    return {**STRATEGIES[strategy], **(dict(rules=DENSE_RULES) if strategy.startswith("structural") else {})}


# every strategy x replacement, and both clause_length modes where clause lengths matter (the structural ones)
ADVERSARIAL_CASES = [(strategy, replacement, mode) for strategy in STRATEGIES for replacement in REPLACEMENTS
                     for mode in (("preceding", "since_boundary") if strategy.startswith("structural") else
                                  ("preceding",))]


@needs_kernel
@pytest.mark.parametrize("strategy, replacement, mode", ADVERSARIAL_CASES,
                         ids=["-".join(case) for case in ADVERSARIAL_CASES])
def test_kernel_equals_torch_on_adversarial_batches(base_masker, strategy, replacement, mode):
    """~0.5 s per case under the interpreter."""
    masker = variant(base_masker, **dense(strategy), **REPLACEMENTS[replacement], lookback=12, clause_length=mode)
    case = ADVERSARIAL_CASES.index((strategy, replacement, mode))
    x = adversarial_batch(masker, (2, 193), seed=case)
    vs = torch.from_numpy(np.random.default_rng(case).random((2, 193)) < 0.1)
    for verse_start in (vs, None):
        expected = torch_path(masker, x, 3, verse_start, row_offset=5)
        label = f"{strategy}/{replacement}/{mode}, verse_start {'given' if verse_start is not None else 'None'}"
        assert expected[1].sum() > 10, label
        assert_same(kernel(masker, x, 3, verse_start, row_offset=5, block=64), expected, label)


@pytest.mark.parametrize("strategy, replacement, mode", ADVERSARIAL_CASES,
                         ids=["-".join(case) for case in ADVERSARIAL_CASES])
def test_sparse_and_dense_layouts_agree(tok, base_masker, kjv_rows, strategy, replacement, mode):
    """The torch path's two layouts (sparse on CPU tensors, dense elsewhere) give identical results: adversarial
    batches, KJV rows, rows without any clause boundary, B=1 / T=1 and int32 ids, with and without verse_start."""
    masker = variant(base_masker, **dense(strategy), **REPLACEMENTS[replacement], lookback=12, clause_length=mode)
    rng = np.random.default_rng(7)
    batches = {"adversarial": adversarial_batch(masker, (4, 257), seed=1), "kjv": kjv_rows[0][5:9, :700],
               **no_boundary_batches(base_masker, tok), "T=1": adversarial_batch(masker, (3, 1), seed=2),
               "int32": adversarial_batch(masker, (1, 130), seed=3).int()}
    for name, x in batches.items():
        vs = torch.from_numpy(rng.random(tuple(x.shape)) < 0.1)
        for verse_start in (vs, None):
            label = f"{name}, verse_start {'given' if verse_start is not None else 'None'}"
            sparse = mask_torch(x, verse_start, masker.tables("cpu"), masker.seed, 4, 1, 3, layout="sparse")
            assert_same(mask_torch(x, verse_start, masker.tables("cpu"), masker.seed, 4, 1, 3, layout="dense"), sparse,
                        label)
            assert name == "T=1" or sparse[1].any(), label


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (1, 7), (3, 65), (0, 5), (4, 0)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_kernel_equals_torch_on_odd_shapes_and_dtypes(tok, shape, dtype):
    masker = make_masker(tok, strategy="uniform", mask_prob=1.0, replacement="bert", bert_split=[0.5, 0.3, 0.2])
    x = adversarial_batch(masker, shape, seed=sum(shape)).to(dtype)
    got, expected = kernel(masker, x, 1, block=32), torch_path(masker, x, 1)
    assert_same(got, expected)
    assert got[0].dtype == dtype


# (shape, ids dtype, replacement, with verse_start flags, block): B=1, T=1, T not a multiple of the block, int32
ODD_CASES = [
    ((1, 1), torch.int64, "mask", False, 32),
    ((1, 1), torch.int32, "bert", True, 32),
    ((7, 1), torch.int32, "mask", True, 32),
    ((1, 2), torch.int32, "bert", False, 32),
    ((1, 97), torch.int64, "bert", True, 32),  # 97 = 3 blocks of 32 + 1
    ((3, 65), torch.int32, "mask", True, 32),
    ((2, 100), torch.int32, "bert", False, 64),
]


@needs_kernel
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_kernel_equals_torch_on_odd_shapes_every_strategy(base_masker, strategy):
    """Every strategy on B=1, T=1, T not a multiple of the block and int32 ids (~1 s per strategy). T=1 rows hold
    one-token connectives, so that they can be masked at all."""
    single = [p[0] for p in map(base_masker.lexicon.pattern_ids, range(base_masker.lexicon.num_patterns))
              if len(p) == 1]
    masked = 0
    for i, (shape, dtype, replacement, flags, block) in enumerate(ODD_CASES):
        masker = variant(base_masker, **dense(strategy), **REPLACEMENTS[replacement])
        if shape[1] == 1:
            x = torch.tensor(single[i:i + shape[0]]).view(shape)
        else:
            x = adversarial_batch(masker, shape, seed=i)
        x = x.to(dtype)
        vs = torch.from_numpy(np.random.default_rng(i).random(shape) < 0.3) if flags else None
        label = f"{strategy}: {shape} {dtype} {replacement} verse_start={flags} block={block}"
        got, expected = kernel(masker, x, 2, vs, block=block), torch_path(masker, x, 2, vs)
        assert_same(got, expected, label)
        assert got[0].dtype == dtype, label
        masked += int(expected[1].sum())
    assert masked > 10


def no_boundary_batches(masker, tok):
    """Batches without a single clause-boundary or verse-separator token: a plain clause, and random rows of
    non-punctuation ids with one-token connectives mixed in."""
    lex = masker.lexicon
    plain = torch.tensor([tok.encode("For he said unto them").ids])
    words = np.flatnonzero(~(lex.clause_boundary | lex.verse_separator | lex.special))
    single = [p[0] for p in map(lex.pattern_ids, range(lex.num_patterns)) if len(p) == 1]
    rng = np.random.default_rng(3)
    rows = np.where(rng.random((3, 150)) < 0.3, rng.choice(single, (3, 150)), rng.choice(words, (3, 150)))
    batches = {"'For he said unto them'": plain, "random words": torch.from_numpy(rows.astype(np.int64))}
    for x in batches.values():
        assert not (lex.clause_boundary | lex.verse_separator)[x.numpy()].any()
    return batches


@pytest.mark.parametrize("mode", ["preceding", "since_boundary"])
def test_batches_without_any_clause_boundary(tok, base_masker, mode):
    """Regression: the torch path crashed with since_boundary on a batch without a clause-boundary token. The clause
    then runs back to the row start: rules with p in {0, 1} make the mask a function of clause_len that must equal
    the reference, and the kernel (where it runs) must equal the torch path, for the default rules too."""
    deterministic = variant(base_masker, strategy="structural", clause_length=mode, lookback=20,
                            rules=[dict(p=1.0, clause_len_gt=4, clause_len_lt=12), dict(p=0.0)])
    randomized = variant(base_masker, strategy="structural", structural_weights=True, clause_length=mode,
                         replacement="bert")
    for name, x in no_boundary_batches(base_masker, tok).items():
        vs = torch.zeros_like(x, dtype=torch.bool)
        vs[:, 0] = True
        for verse_start in (vs, None):
            label = f"{mode}, {name}, verse_start {'given' if verse_start is not None else 'None'}"
            out = torch_path(deterministic, x, 0, verse_start)
            expected = torch.zeros_like(out[1])
            for b, row in enumerate(x.tolist()):
                flags = None if verse_start is None else verse_start[b].tolist()
                for start, length, _, _, cl in reference_cells(row, flags, deterministic.lexicon, 20, mode):
                    expected[b, start:start + length] = 4 < cl < 12
            assert torch.equal(out[1], expected), label
            if KERNEL_RUNS:
                for masker in (deterministic, randomized):
                    assert_same(kernel(masker, x, 5, verse_start, block=64), torch_path(masker, x, 5, verse_start),
                                label)


def test_long_runs_of_clause_stops(tok, base_masker):
    """Runs of 0 to lookback + 3 stop tokens before a connective, after clauses of 0 to 14 words, and runs that
    reach back to the row start: the torch path walks back over a run at most lookback - 1 steps, which must give
    the documented clause_len (checked through rules with p in {0, 1}) whatever the run's length; the kernel (where
    it runs) must agree on these rows too."""
    lookback = 12
    lex = base_masker.lexicon
    stops = np.flatnonzero(lex.clause_boundary)
    separator = int(np.flatnonzero(lex.verse_separator)[0])
    words = np.flatnonzero(~(lex.clause_boundary | lex.verse_separator | lex.special))
    connective = tok.encode("for", add_special_tokens=False).ids
    assert len(connective) == 1 and find_matches(connective, lex)
    rng = np.random.default_rng(11)
    rows = []
    for row_start_run in range(lookback + 4):  # a run from the row start, then segments
        row = [int(rng.choice(stops))] * row_start_run + connective
        while len(row) < 240:  # ~15 segments a row, ~240 in all: every run length with many clause lengths
            run = int(rng.integers(lookback + 4))
            row += rng.choice(words, int(rng.integers(15))).tolist()
            row += [separator if rng.random() < 0.2 else int(rng.choice(stops)) for _ in range(run)] + connective
        rows.append(row[:240])
    x = torch.tensor(rows, dtype=torch.int64)
    for mode in ("preceding", "since_boundary"):
        for low, high in ((0, 5), (3, 9), (8, 13)):
            masker = variant(base_masker, strategy="structural", clause_length=mode, lookback=lookback,
                             rules=[dict(p=1.0, clause_len_gt=low, clause_len_lt=high), dict(p=0.0)])
            out = torch_path(masker, x, 0)
            expected = torch.zeros_like(out[1])
            for b, row in enumerate(rows):
                for start, length, _, _, cl in reference_cells(row, None, lex, lookback, mode):
                    expected[b, start:start + length] = low < cl < high
            label = f"{mode}, {low} < clause_len < {high}"
            assert torch.equal(out[1], expected), label
            assert expected.any() and (~expected[x == connective[0]]).any(), label
            if KERNEL_RUNS and low == 3:
                assert_same(kernel(masker, x, 2, block=64), out, label)


@pytest.mark.parametrize("mode", ["preceding", "since_boundary"])
def test_tokens_that_start_a_connective_and_end_a_clause(tok, base_masker, kjv_rows, mode):
    """A token can both start a pattern and end a clause (a tokenizer that keeps "for," as one token, with ','
    in clause_punctuation); the sparse path then counts the stops before a start differently. The tables are
    edited so that the one-token connectives "for" and "but" are clause boundaries too: the sparse and dense
    layouts (and the kernel, where it runs) must still agree, on KJV and adversarial rows, for rules with p in
    {0, 1} (where the edit changes the mask) and for the default rules with weights and BERT replacement."""
    import dataclasses

    from genesis.flags import CLAUSE_BOUNDARY
    from genesis.masking.tables import SCAN_STOP

    deterministic = variant(base_masker, strategy="structural", clause_length=mode, lookback=12,
                            rules=[dict(p=1.0, clause_len_gt=0, clause_len_lt=6), dict(p=0.0)])
    randomized = variant(base_masker, strategy="structural", structural_weights=True, clause_length=mode,
                         lookback=12, replacement="bert")
    both = [tok.encode(w, add_special_tokens=False).ids[0] for w in (" for", " but", "for", "but")]
    rng = np.random.default_rng(2)
    batches = {"kjv": kjv_rows[0][10:26], "adversarial": adversarial_batch(base_masker, (3, 300), seed=4)}
    changed = 0  # batches whose deterministic mask the edit changes
    for masker in (deterministic, randomized):
        tables = masker.tables("cpu")
        edited = {name: getattr(tables, name).clone() for name in ("token_flags", "clause_boundary",
                                                                    "clause_stop", "scan_code")}
        for v in both:
            assert tables.single_entry[v] >= 0, tok.id_to_token(v)
            edited["token_flags"][v] |= CLAUSE_BOUNDARY
            edited["clause_boundary"][v] = edited["clause_stop"][v] = True
            edited["scan_code"][v] |= SCAN_STOP
        edited = dataclasses.replace(tables, **edited, start_can_stop=True)
        for name, x in batches.items():
            vs = torch.from_numpy(rng.random(tuple(x.shape)) < 0.1)
            for verse_start in (vs, None):
                label = f"{mode}, {name}, verse_start {'given' if verse_start is not None else 'None'}"
                args = (x, verse_start, edited, masker.seed, 6, masker.rank, 2)
                sparse = mask_torch(*args, layout="sparse")
                assert_same(mask_torch(*args, layout="dense"), sparse, label)
                if masker is deterministic:
                    changed += not torch.equal(sparse[1], mask_torch(x, verse_start, tables, *args[3:])[1])
                if KERNEL_RUNS and name == "adversarial":  # (the interpreter would take ~10 s per KJV batch)
                    assert_same(kernel(masker, x, 6, verse_start, row_offset=2, tables=edited), sparse,
                                label + ", kernel")
    assert changed >= 2, f"{mode}: the edit changed the mask of {changed} of 4 batches"


@needs_kernel
def test_kernel_reads_strided_rows(tok, kjv_rows):
    """The trainer's inputs are (B, T) views of (B, T+1) windows: the kernel reads them in place."""
    masker = make_masker(tok, strategy="structural")
    window, flags = kjv_rows[0][:2, :301].to(KERNEL_DEVICE), kjv_rows[1][:2, :301].to(KERNEL_DEVICE)
    x, vs = window[:, :-1], flags[:, :-1]
    assert not x.is_contiguous()
    expected = torch_path(masker, x.contiguous(), 4, vs.contiguous())
    assert_same(kernel(masker, x, 4, vs, block=128), expected)
    assert_same(torch_path(masker, x, 4, vs), expected)


@needs_kernel
def test_kernel_on_transposed_inputs(tok, kjv_rows):
    """Column-strided inputs (a transposed copy, strides (1, B)) give row-major outputs equal to the contiguous
    input's: the kernel copies them to rows and writes its outputs row-major."""
    masker = make_masker(tok, strategy="uniform", mask_prob=1.0)
    x, vs = kjv_rows[0][:3, :200].contiguous(), kjv_rows[1][:3, :200].contiguous()
    xt, vst = x.t().contiguous().t().to(KERNEL_DEVICE), vs.t().contiguous().t().to(KERNEL_DEVICE)
    assert xt.stride() == (1, 3)
    expected = torch_path(masker, x, 5, vs)
    assert bool(expected[1].any())
    got = kernel(masker, xt, 5, vst)
    assert all(t.is_contiguous() for t in got)
    assert_same(got, expected)
    assert_same(torch_path(masker, xt.cpu(), 5, vst.cpu()), expected)


@needs_kernel
def test_kernel_result_does_not_depend_on_block_size(tok, kjv_rows):
    masker = make_masker(tok, strategy="structural")
    x, vs = kjv_rows[0][:1, :500].contiguous(), kjv_rows[1][:1, :500].contiguous()
    assert_same(kernel(masker, x, 2, vs, block=32), kernel(masker, x, 2, vs, block=256))


COMPILE_CHECK = """
import sys, torch
from tokenizers import Tokenizer
from genesis.kernels.experimental.mask_v2 import compile_v2_for
from genesis.kernels.mask import compile_for, compile_readout_for
from genesis.masking import ConnectiveMasker
tok = Tokenizer.from_file(sys.argv[1])
if sys.argv[2] == "everything":
    masker = ConnectiveMasker.from_tokenizer(tok, strategy="structural", structural_weights=True, replacement="bert",
                                             chain=True, log=None)
    x, vs = torch.zeros(2, 100, dtype=torch.int64), torch.zeros(2, 100, dtype=torch.bool)
else:
    masker = ConnectiveMasker.from_tokenizer(tok, strategy="uniform", clause_length="since_boundary", log=None)
    x, vs = torch.zeros(2, 100, dtype=torch.int32), None
for version, compile_version in ((1, compile_for), (2, compile_v2_for)):
    kernel = compile_version(89, x, vs, masker.tables("cpu"))
    print("compiled version", version, len(kernel.asm["cubin"]), "bytes of sm_89 code")
readout = ConnectiveMasker.from_tokenizer(tok, strategy="structural", readout=True, log=None)  # mask replacement
kernel = compile_readout_for(89, x, vs, readout.tables("cpu"))
print("compiled readout", len(kernel.asm["cubin"]), "bytes of sm_89 code")
"""


@pytest.mark.parametrize("variant", ["everything", "nothing"])
def test_kernel_compiles_for_a_gpu_without_one(tok, tmp_path, variant):
    """The interpreter runs Python the compiler rejects (it read a plain module-level constant that compiled
    kernels cannot, and only the first GPU run found out). Triton's compiler and ptxas need no GPU: compile the
    kernel (both versions) for an RTX 40xx (sm_89) with every branch on (chains too), and with every branch off, as
    the launcher would; and the readout kernel, with verse_start flags and int64 ids and without them, int32."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton >= 3.9 warns when unset; 1 is what launches use
    proc = subprocess.run([sys.executable, "-c", COMPILE_CHECK, str(path), variant], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.count("compiled version") == 2, proc.stderr[-3000:]
    assert proc.stdout.count("compiled readout") == 1, proc.stderr[-3000:]


@needs_kernel
def test_kernel_never_reads_out_of_bounds_on_invalid_ids(tok):
    """Ids outside the vocabulary are never connectives and pass through unchanged, in both paths."""
    masker = make_masker(tok, strategy="uniform", mask_prob=1.0, check_ids=False)
    x = adversarial_batch(masker, (2, 80))
    x[0, ::7] = -3
    x[1, ::5] = 10**6
    expected = torch_path(masker, x, 0)
    assert_same(kernel(masker, x, 0, block=32), expected)
    invalid = (x < 0) | (x >= masker.tables("cpu").vocab_size)
    assert invalid.sum() >= 20 and expected[1][~invalid].any()  # p = 1: the valid connectives are all masked
    assert torch.equal(expected[0][invalid], x[invalid]) and not expected[1][invalid].any()


def test_row_counter_wraps_at_32_bits(tok, base_masker, kjv_rows):
    """The row is one 32-bit Philox counter word. The masker refuses a batch whose last row would pass 2**32 (it
    would repeat row 0's masks); below it, both torch layouts and the kernel wrap row_offset + b = 2**32 onto row 0
    alike. Regression: the torch path once passed 2**32 on unwrapped and drew other numbers than the kernel."""
    masker = variant(base_masker, strategy="uniform", mask_prob=0.5)
    x = kjv_rows[0][:2, :200].contiguous()
    with pytest.raises(MaskingError, match=r"row_offset \+ rows must be <= 2\*\*32"):
        masker(x, step=3, row_offset=2**32 - 1)
    wrap = 2**32 - 1
    high = torch_path(masker, x, 3, row_offset=wrap)  # sparse == dense checked inside
    low = masker(x[1:], step=3, row_offset=0)
    assert low.mask.any() and torch.equal(high[1][1:], low.mask) and torch.equal(high[0][1:], low.input_ids)
    assert not torch.equal(masker(x[1:], step=3, row_offset=1).mask, low.mask)  # the counter decides, not the row
    top = masker(x[:1], step=3, row_offset=wrap)  # the last row the masker allows
    assert torch.equal(top.mask, high[1][:1])
    if KERNEL_RUNS:
        assert_same(kernel(masker, x, 3, row_offset=wrap), high, "kernel at the wrap")


@needs_kernel
def test_kernel_equals_torch_at_the_largest_keys(base_masker, kjv_rows):
    """Every Philox key and counter word at its top: seed 2**63 - 1 (both key words), step and rank 2**32 - 1 (Triton
    types such an argument as int64, not int32), the last rows of the 32-bit row counter; the kernel, both torch
    layouts and the masker agree exactly, and the masks differ from those at small keys."""
    every = variant(base_masker, strategy="uniform", mask_prob=1.0)(kjv_rows[0][:200, :400], step=0).mask
    rows = every.sum(dim=1).topk(4).indices  # the rows richest in connectives: enough draws to tell keys apart
    x, vs = kjv_rows[0][rows, :400].contiguous(), kjv_rows[1][rows, :400].contiguous()
    for strategy in ("uniform", "structural"):
        masker = variant(base_masker, strategy=strategy, mask_prob=0.5, replacement="bert")
        small = masker(x, step=1, verse_start=vs)
        masker.seed, masker.rank = 2**63 - 1, 2**32 - 1
        step, offset = 2**32 - 1, 2**32 - len(x)  # the last rows of the counter
        expected = torch_path(masker, x, step, vs, row_offset=offset)
        assert_same(kernel(masker, x, step, vs, row_offset=offset), expected, strategy)
        out = masker(x, step=step, verse_start=vs, row_offset=offset)
        assert_same((out.input_ids, out.mask, out.classes, out.connectives), expected[:4], f"{strategy} masker")
        assert out.mask.sum() >= 5 and not torch.equal(out.mask, small.mask), strategy


# ----------------------------------------------------------------------------------------------------------------
# The torch path == the lexicon oracle, on the whole KJV


def test_every_connective_occurrence_is_found(tok, kjv_rows):
    """With p = 1 the mask is exactly the pieces of every whole-word match of `find_matches` (row edges count as
    word boundaries), and `connectives` names the right lexicon entry — over the whole KJV training split."""
    masker = make_masker(tok, strategy="uniform", mask_prob=1.0)
    x, vs = kjv_rows
    out = masker(x, step=0, verse_start=vs)
    expected_mask = torch.zeros_like(out.mask)
    expected_entry = torch.full_like(out.connectives, -100)
    n_words = 0
    for b, row in enumerate(x.tolist()):
        for start, length, entry in find_matches(row, masker.lexicon):
            expected_mask[b, start:start + length] = True
            expected_entry[b, start:start + length] = entry
            n_words += 1
    assert torch.equal(out.mask, expected_mask)
    assert torch.equal(out.matched, expected_mask)
    assert torch.equal(out.connectives, expected_entry)
    assert (out.input_ids[out.mask] == masker.mask_id).all() and torch.equal(out.input_ids[~out.mask], x[~out.mask])
    classes = torch.tensor(masker.lexicon.entry_class, dtype=torch.int64)
    assert torch.equal(out.classes[out.mask], classes[out.connectives[out.mask]])
    assert (out.classes[~out.mask] == -100).all()
    assert masker.stats(out, x)["masked_words"].item() == n_words
    assert n_words > 0.018 * x.numel()  # ~2% of KJV tokens are connectives


# ----------------------------------------------------------------------------------------------------------------
# Causal chains (masking.chain) and every match (out.matched)


def reference_chains(row, lex, gap):
    """The chains of one row by their definition, in plain Python over the oracle's matches: runs of consecutive
    causal matches whose starts lie at most `gap` apart, two or more long. Each chain: [(start, length, entry)]."""
    causal = CLASSES.index("causal")
    chains, run = [], []
    for match in find_matches(row, lex):
        if lex.entry_class[match[2]] != causal:
            continue
        if run and match[0] - run[-1][0] > gap:
            chains += [run] if len(run) > 1 else []
            run = []
        run.append(match)
    return chains + ([run] if len(run) > 1 else [])


def test_chains_are_masked_all_or_nothing_by_their_head(base_masker, kjv_rows):
    """On real KJV rows (both torch layouts): every piece of every chain member is masked exactly when the chain's
    head is masked without chains (the same draw, the head's probability); every other match is masked exactly as
    without chains; `matched` is every piece of every match, whatever was masked."""
    x, vs = kjv_rows[0][:160], kjv_rows[1][:160]
    chained = variant(base_masker, chain=True)
    for gap in (48, 7):
        chained = variant(base_masker, chain=True, chain_gap=gap)
        on, off = torch_path(chained, x, 5, vs), torch_path(base_masker, x, 5, vs)
        in_chain = torch.zeros_like(on[1])
        expected_matched = torch.zeros_like(on[1])
        decided, broken = {True: 0, False: 0}, 0
        for b, row in enumerate(x.tolist()):
            for start, length, _ in find_matches(row, base_masker.lexicon):
                expected_matched[b, start:start + length] = True
            for chain in reference_chains(row, base_masker.lexicon, gap):
                head = bool(off[1][b, chain[0][0]])
                pieces = torch.cat([torch.arange(start, start + length) for start, length, _ in chain])
                in_chain[b, pieces] = True
                assert (on[1][b, pieces] == head).all(), f"gap {gap}, row {b}: chain {chain} not decided by its head"
                decided[head] += 1
                broken += bool(off[1][b, pieces].any() and not off[1][b, pieces].all())
        assert min(decided.values()) > 20 and broken > 20, (gap, decided, broken)  # without chains: broken
        assert torch.equal(on[1][~in_chain], off[1][~in_chain])  # other classes and lone causal matches as today
        assert torch.equal(on[4], expected_matched) and torch.equal(off[4], expected_matched)
        assert torch.equal(on[0][~in_chain], off[0][~in_chain])


def test_chain_rate_follows_the_head_probability(base_masker, kjv_rows):
    """Weighted masking with chains over the KJV training split: a chain is masked at base_probability x its head's
    weight, whichever words follow the head (exact binomial test per head word, ALPHA = 1e-6)."""
    masker = variant(base_masker, strategy="weighted", base_probability=0.5, chain=True)
    x, vs = kjv_rows
    heads = [(b, chain[0][0], chain[0][2], chain[-1][0]) for b, row in enumerate(x.tolist())
             for chain in reference_chains(row, masker.lexicon, masker.config.chain_gap)]
    b, head_start, head_entry, last_start = (torch.tensor(column) for column in zip(*heads))
    weights = torch.tensor(masker.lexicon.entry_weight, dtype=torch.float32)
    size = len(masker.lexicon.words)
    masked, drawn = torch.zeros(size, dtype=torch.int64), torch.zeros(size, dtype=torch.int64)
    for step in range(STEPS):
        mask = masker(x, step=step, verse_start=vs).mask
        assert torch.equal(mask[b, head_start], mask[b, last_start])
        masked += torch.bincount(head_entry[mask[b, head_start]], minlength=size)
        drawn += torch.bincount(head_entry, minlength=size)
    tested = 0
    for entry in torch.nonzero(drawn >= 500).flatten().tolist():
        p = float(torch.clamp(torch.tensor(0.5, dtype=torch.float32) * weights[entry], 0, 1))
        assert_rate(int(masked[entry]), int(drawn[entry]), p, f"chains headed by {masker.lexicon.words[entry]!r}")
        tested += 1
    assert tested >= 4 and int(drawn.sum()) > 10_000, (tested, int(drawn.sum()))


@needs_kernel
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_kernel_equals_torch_with_chains(base_masker, kjv_rows, strategy):
    """Chains on: both kernel versions == both torch layouts on KJV rows longer than a block (T = 300, blocks of 64,
    version 2 windows of 128) whose chains cross block edges, on adversarial rows, and on B = 1 / T = 1."""
    replacement = "bert" if strategy in ("uniform", "structural") else "mask"
    masker = variant(base_masker, **dense(strategy), **REPLACEMENTS[replacement], chain=True)
    x, vs = kjv_rows[0][:120, 100:400], kjv_rows[1][:120, 100:400]
    crossing = [sum(chain[0][0] // 64 != chain[-1][0] // 64 for chain in reference_chains(row, masker.lexicon, 48))
                for row in x.tolist()]
    rows = torch.tensor(crossing).argsort(descending=True, stable=True)[:3]  # the rows with most chains across blocks
    assert sum(crossing[r] for r in rows) >= 6
    x, vs = x[rows].contiguous(), vs[rows].contiguous()
    for verse_start in (vs, None) if strategy.startswith("structural") else (vs,):  # flags matter only there
        expected = torch_path(masker, x, 17, verse_start, row_offset=2)
        assert expected[1].any() and expected[4].sum() > expected[1].sum()
        assert_same(kernel(masker, x, 17, verse_start, row_offset=2, block=64), expected, f"{strategy} KJV")
    for gap in (3, 20):
        small_gap = variant(masker, chain_gap=gap)
        y = adversarial_batch(masker, (2, 193), seed=gap)
        assert_same(kernel(small_gap, y, 3, block=32), torch_path(small_gap, y, 3), f"{strategy} gap {gap}")
    single = [p[0] for p in map(masker.lexicon.pattern_ids, range(masker.lexicon.num_patterns)) if len(p) == 1]
    for y in (torch.tensor([[single[0]]]), adversarial_batch(masker, (1, 97), seed=1), x[:1, :1]):
        assert_same(kernel(masker, y, 4, block=32), torch_path(masker, y, 4), f"{strategy} {tuple(y.shape)}")


def test_chain_config_is_checked(tok):
    with pytest.warns(UserWarning, match=r"^masking.chain_gap has no effect while masking.chain = false$"):
        make_masker(tok, chain_gap=10)
    with pytest.raises(MaskingError, match=r"chain_gap: must be in \[1, 2\*\*20\]"):
        make_masker(tok, chain=True, chain_gap=0)


def test_report_counts_the_chains_of_a_token_stream(base_masker, kjv_rows):
    """chain_statistics (and report) over the KJV training split equal the reference chain finder's counts."""
    masker = variant(base_masker, chain=True)
    tokens = kjv_rows[0].flatten()
    stats = masker.chain_statistics(tokens)
    chains = reference_chains(tokens.tolist(), masker.lexicon, 48)
    lengths = sorted({len(c) for c in chains})
    assert stats["chains"] == len(chains) and stats["members"] == sum(map(len, chains))
    assert stats["histogram"] == {n: sum(len(c) == n for c in chains) for n in lengths}
    report = masker.report(tokens)
    assert f"{len(chains)} chains" in report


# ----------------------------------------------------------------------------------------------------------------
# Rules


def reference_cells(row, verse_start, lex, lookback, mode="preceding"):
    """(start, length, entry, verse_initial, clause_len) per match, straight from the documented semantics."""
    boundary, sep = lex.clause_boundary, lex.verse_separator
    out = []
    for start, length, entry in find_matches(row, lex):
        if verse_start is not None:
            verse_initial = bool(verse_start[start])
        else:
            verse_initial = start > 0 and bool(sep[row[start - 1]])
        clause_len = clause_length(row, start, boundary, sep, lookback, mode)
        out.append((start, length, entry, verse_initial, clause_len))
    return out


@pytest.mark.parametrize("mode", ["preceding", "since_boundary"])
@pytest.mark.parametrize("use_flags", [True, False])
@pytest.mark.parametrize(
    "rules",
    [
        [dict(p=1.0, verse_initial=True, clause_len_gt=10), dict(p=0.0)],
        [dict(p=1.0, verse_initial=False, clause_len_gt=3, clause_len_lt=9), dict(p=0.0)],
        [dict(p=0.0, verse_initial=True), dict(p=1.0, clause_len_gt=15)],
    ],
)
def test_structural_cells_follow_the_documented_semantics(tok, kjv_rows, rules, use_flags, mode):
    """Rules with p in {0, 1} make the mask a deterministic function of (verse_initial, clause_len): it must equal
    the reference computed match by match."""
    lookback = 20
    masker = make_masker(tok, strategy="structural", rules=rules, lookback=lookback, clause_length=mode)
    x, vs = kjv_rows[0][:40], kjv_rows[1][:40]
    out = masker(x, step=0, verse_start=vs if use_flags else None)
    expected = torch.zeros_like(out.mask)
    for b in range(x.shape[0]):
        row, flags = x[b].tolist(), vs[b].tolist() if use_flags else None
        for start, length, _, vi, cl in reference_cells(row, flags, masker.lexicon, lookback, mode):
            rule = next((r for r in rules if r.get("verse_initial", vi) == vi and cl > r.get("clause_len_gt", -1)
                         and cl < r.get("clause_len_lt", 10**9)), None)  # no rule matches: p = 0
            if rule is not None and rule["p"] == 1.0:
                expected[b, start:start + length] = True
    assert torch.equal(out.mask, expected)
    if mode == "preceding":  # every rule is reachable on the KJV (with since_boundary, rule 1 never fires)
        assert expected.any() and (~expected).any()


def test_clause_length_reference():
    """The plain statement of the two modes on hand-made rows: 1 = ',', 2 = '\\n', everything else a word."""
    boundary = np.zeros(10, dtype=bool)
    boundary[1] = True
    separator = np.zeros(10, dtype=bool)
    separator[2] = True
    row = [5, 5, 5, 1, 5, 5, 1, 2, 7, 5, 5]  # w w w , w w , \n For w w
    assert clause_length(row, 8, boundary, separator, 30) == 2  # skips ", \n", counts the two words before
    assert clause_length(row, 8, boundary, separator, 30, "since_boundary") == 2  # distance to the ','
    assert clause_length(row, 9, boundary, separator, 30) == 1  # mid-clause: the clause so far ("For")
    assert clause_length(row, 3, boundary, separator, 30) == 3  # back to the row start
    assert clause_length(row, 0, boundary, separator, 30) == 0  # nothing before
    assert clause_length(row, 0, boundary, separator, 30, "since_boundary") == 1
    assert clause_length([5] * 50, 45, boundary, separator, 30) == 30  # capped
    assert clause_length([1] * 40 + [5], 40, boundary, separator, 30) == 0  # a stop run of >= lookback tokens
    assert clause_length([5] * 50, 45, boundary, separator, 30, "since_boundary") == 30


def test_probability_tables(tok):
    from genesis.config import MaskingConfig
    from genesis.masking.tables import compile_prob_table

    table, weighted = compile_prob_table(MaskingConfig(strategy="structural", lookback=30))
    cells = table.view(2, 31)
    assert not weighted
    assert cells[1, 11:].eq(0.8).all() and cells[1, 1:11].eq(0.6).all()
    assert cells[0, 16:].eq(0.5).all() and cells[0, 1:16].eq(0.3).all()
    table, weighted = compile_prob_table(MaskingConfig(strategy="weighted", base_probability=0.4))
    assert weighted and table.eq(0.4).all()


# ----------------------------------------------------------------------------------------------------------------
# Rates on the KJV (binomial tests)

# Every rate below is an exact two-sided binomial test (twice the smaller tail) at ALPHA per test. The file runs fewer
# than 200 such tests (about 150: 24 + 24 connectives, <= 96 structural (rule, connective) pairs, 4 cells, 2 BERT
# fractions), so the family-wise chance of a false failure is below 200 * ALPHA = 2e-4 (Bonferroni). Draws are
# keyed by a fixed seed: a pass is reproducible, and only a change in the draws can turn it into a failure.
ALPHA = 1e-6
RARE = 300  # words with fewer occurrences in the training split also get windows, repeated up to this many
STEPS = 10  # every word is then drawn at least RARE * STEPS = 3,000 times per test


def binomial_p_value(k, n, p):
    """Exact two-sided p-value of k successes in n Bernoulli(p) draws: twice the smaller tail, at most 1."""
    if p <= 0.0 or p >= 1.0:
        return float(k == (0 if p <= 0.0 else n))
    i = torch.arange(n + 1, dtype=torch.float64)
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1) + i * math.log(p)
               + (n - i) * math.log1p(-p))
    pmf = log_pmf.exp()
    return min(1.0, 2.0 * min(pmf[: k + 1].sum().item(), pmf[k:].sum().item()))


def assert_rate(k, n, p, what, power=0.0):
    """k of n masked agrees with p at ALPHA; with `power`, a true rate of p +- power would have been rejected."""
    assert n > 0, f"{what}: never drawn"
    p_value = binomial_p_value(k, n, p)
    assert p_value >= ALPHA, f"{what}: {k}/{n} = {k / n:.4f} masked, expected {p:.4f} (p-value {p_value:.1e})"
    for off in (p - power, p + power) if power else ():
        if 0.0 < off < 1.0:
            assert binomial_p_value(k, n, off) < ALPHA, f"{what}: {n} draws cannot tell {p:.3f} from {off:.3f}"


@dataclass
class RateBatch:
    """A batch and every match in it (by the oracle), with its rule inputs for the default lookback and mode."""

    x: torch.Tensor
    verse_start: torch.Tensor
    row: torch.Tensor  # (M,) int64, per match
    start: torch.Tensor
    entry: torch.Tensor
    verse_initial: torch.Tensor  # bool
    clause_len: torch.Tensor


def rate_batch(x, vs, lex, lookback, mode):
    cells = [reference_cells(r, f, lex, lookback, mode) for r, f in zip(x.tolist(), vs.tolist())]
    fields = [(b, start, entry, vi, cl) for b, row in enumerate(cells) for start, _, entry, vi, cl in row]
    b, start, entry, vi, cl = (torch.tensor(column) for column in zip(*fields))
    return RateBatch(x, vs, b, start, entry, vi.bool(), cl)


@pytest.fixture(scope="module")
def rate_batches(kjv_corpus, base_masker):
    """The whole training split as rows of 1024, plus 64-token windows of the split around every occurrence of a
    word that occurs fewer than RARE times, each repeated so that the word occurs RARE times or more per step. Rows
    are keyed by their index, so repeated windows get independent draws; the oracle finds the matches (and their
    verse_initial / clause_len) in each window, which gives the window edges their documented meaning."""
    cfg, lex = base_masker.config, base_masker.lexicon
    data = kjv_corpus.splits["train"]
    n = len(data) // 1024 * 1024
    tokens = np.asarray(data.tokens[:n]).astype(np.int64)
    flags = np.asarray(data.verse_start[:n]).astype(bool)
    full = rate_batch(torch.from_numpy(tokens).view(-1, 1024), torch.from_numpy(flags).view(-1, 1024), lex,
                      cfg.lookback, cfg.clause_length)
    counts = torch.bincount(full.entry, minlength=len(lex.words))
    starts, repeats = [], []
    for entry in torch.nonzero((counts > 0) & (counts < RARE)).flatten().tolist():
        at = full.row[full.entry == entry] * 1024 + full.start[full.entry == entry]
        starts += np.clip(at.numpy() - 48, 0, n - 64).tolist()
        repeats += [math.ceil(RARE / int(counts[entry]))] * len(at)
    index = np.repeat(np.array(starts), repeats)[:, None] + np.arange(64)
    windows = rate_batch(torch.from_numpy(tokens[index]), torch.from_numpy(flags[index]), lex, cfg.lookback,
                         cfg.clause_length)
    return [full, windows]


def masked_counts(masker, batches, groups, size, steps=STEPS):
    """(masked, drawn) per group over `steps` steps, counted at each match's first piece. `groups(batch)` gives each
    match of the batch its group index, in [0, size)."""
    masked, drawn = torch.zeros(size, dtype=torch.int64), torch.zeros(size, dtype=torch.int64)
    for batch in batches:
        group = groups(batch)
        drawn += torch.bincount(group, minlength=size) * steps
        for step in range(steps):
            hit = masker(batch.x, step=step, verse_start=batch.verse_start).mask[batch.row, batch.start]
            masked += torch.bincount(group[hit], minlength=size)
    return masked.tolist(), drawn.tolist()


def occurring_words(batches, lex):
    return {lex.words[e] for e in batches[0].entry.tolist()}


@pytest.mark.parametrize("strategy", ["uniform", "weighted"])
def test_rates_per_connective(base_masker, rate_batches, strategy):
    """Every connective of the KJV training split, at p = mask_prob (uniform) or base_probability x weight
    (weighted), each drawn >= 3,000 times: a rate off by 0.1 would fail."""
    config = dict(strategy="uniform", mask_prob=0.3) if strategy == "uniform" else dict(strategy="weighted",
                                                                                     base_probability=0.5)
    masker = variant(base_masker, **config)
    words = masker.lexicon.words
    masked, drawn = masked_counts(masker, rate_batches, lambda batch: batch.entry, len(words))
    tested = set()
    for entry, (k, n) in enumerate(zip(masked, drawn)):
        if n == 0:
            continue
        weight = DEFAULT_CONNECTIVES[words[entry]][0]
        p = 0.3 if strategy == "uniform" else 0.5 * weight
        assert n >= RARE * STEPS, words[entry]
        assert_rate(k, n, p, f"{strategy} {words[entry]}", power=0.1)
        tested.add(words[entry])
    assert tested == occurring_words(rate_batches, masker.lexicon) and len(tested) >= 20


# the default rules, in order: (name, p)
DEFAULT_CELLS = [("verse-initial, clause > 10", 0.8), ("verse-initial", 0.6), ("inside, clause > 15", 0.5),
                 ("inside", 0.3)]


def default_rule(batch):
    """Index into DEFAULT_CELLS of the rule each match falls under."""
    vi, cl = batch.verse_initial, batch.clause_len
    return torch.where(vi, torch.where(cl > 10, 0, 1), torch.where(cl > 15, 2, 3))


def test_structural_rates_per_cell(base_masker, rate_batches):
    masker = variant(base_masker, strategy="structural")
    assert masker.config.lookback == 30 and masker.config.clause_length == "preceding"
    masked, drawn = masked_counts(masker, rate_batches[:1], default_rule, len(DEFAULT_CELLS), steps=3)
    for (name, p), k, n in zip(DEFAULT_CELLS, masked, drawn, strict=True):
        assert n >= 300, name
        assert_rate(k, n, p, name)


def test_structural_weighted_rates_per_cell_and_connective(base_masker, rate_batches):
    """structural_weights=True: p = cell x weight, for every (rule, connective) pair that occurs."""
    masker = variant(base_masker, strategy="structural", structural_weights=True)
    words = masker.lexicon.words
    E = len(words)
    masked, drawn = masked_counts(masker, rate_batches, lambda batch: default_rule(batch) * E + batch.entry, 4 * E)
    tested, pairs = set(), 0
    for group, (k, n) in enumerate(zip(masked, drawn)):
        if n == 0:
            continue
        (name, cell_p), word = DEFAULT_CELLS[group // E], words[group % E]
        assert_rate(k, n, cell_p * DEFAULT_CONNECTIVES[word][0], f"{word} ({name})")
        tested.add(word)
        pairs += 1
    assert tested == occurring_words(rate_batches, masker.lexicon) and pairs <= 4 * len(tested)


def test_bert_split_fractions(tok, kjv_rows):
    masker = make_masker(tok, strategy="uniform", mask_prob=1.0, replacement="bert", bert_split=[0.8, 0.1, 0.1])
    x, vs = kjv_rows[0][:300], kjv_rows[1][:300]
    out = masker(x, step=0, verse_start=vs)
    picked_ids, original = out.input_ids[out.mask], x[out.mask]
    n = len(picked_ids)
    masked = (picked_ids == masker.mask_id).sum().item()
    kept = (picked_ids == original).sum().item()
    pool = masker.tables("cpu").random_pool.numel()
    assert_rate(masked, n, 0.8, "bert: mask")
    assert_rate(kept, n, 0.1 + 0.1 / pool, "bert: keep (or a random draw of the same token)")
    from genesis.tokenizer import special_ids

    randoms = picked_ids[(picked_ids != masker.mask_id) & (picked_ids != original)]
    assert len(randoms) > 0.08 * n and not set(randoms.tolist()) & special_ids(tok)


MULTI_PIECE_TEXT = ("And however he went, accordingly they did. Nevertheless the LORD said, Howbeit ye shall "
                    "not, notwithstanding they were afraid; insomuch that whereas I was blind, now I see. ")


@pytest.mark.parametrize("replacement", ["mask", "bert"])
def test_word_pieces_share_one_decision(tok, base_masker, replacement):
    """A word of several tokens ("however" = "Ġhow" + "ever", "accordingly" = "Ġaccording" + "ly") is one draw: at
    p = 0.5 all its pieces are masked or none is, and under bert all get the word's mask / random / keep choice
    (word 1 of the draw at the word's start), each random piece its own token (word 2 of the draw at its own
    column)."""
    masker = variant(base_masker, strategy="uniform", mask_prob=0.5, replacement=replacement,
                     bert_split=[0.4, 0.3, 0.3])
    text = torch.tensor(tok.encode(MULTI_PIECE_TEXT * 60).ids)
    x = torch.cat([text[: len(text) // 128 * 128].view(-1, 128), adversarial_batch(masker, (8, 128), seed=5)])
    out = masker(x, step=7)
    words = [(b, start, length, entry) for b, row in enumerate(x.tolist())
             for start, length, entry in find_matches(row, masker.lexicon) if length > 1]
    seen = {"however": set(), "accordingly": set()}
    choices = {"mask": 0, "random": 0, "keep": 0}
    pool = masker.tables("cpu").random_pool
    for b, start, length, entry in words:
        word = masker.lexicon.words[entry]
        where = f"{word} at row {b}, column {start}: {x[b, start:start + length].tolist()} -> " \
                f"{out.input_ids[b, start:start + length].tolist()}"
        picked = out.mask[b, start:start + length]
        assert picked.all() or not picked.any(), where
        seen.get(word, set()).add(bool(picked[0]))
        ids, original = out.input_ids[b, start:start + length], x[b, start:start + length]
        if not picked[0]:
            assert torch.equal(ids, original) and (out.connectives[b, start:start + length] == -100).all(), where
            continue
        assert (out.connectives[b, start:start + length] == entry).all(), where
        if replacement == "mask":
            assert (ids == masker.mask_id).all(), where
            continue
        kinds = {"mask" if t == masker.mask_id else "keep" if t == o else "random"
                 for t, o in zip(ids.tolist(), original.tolist())}
        assert kinds in ({"mask"}, {"keep"}, {"random"}) or kinds == {"random", "keep"}, (where, kinds)
        # the exact draws: the word's choice from its start, each piece's random token from its own column
        columns = torch.arange(start, start + length)
        full = torch.full_like
        _, w1, w2, _ = philox4x32(masker.seed, columns, full(columns, b), full(columns, 7), full(columns, masker.rank))
        choice = uniform_from_bits(w1[:1]).item()
        if choice < 0.4:
            expected, kind = torch.full((length,), masker.mask_id), "mask"
        elif choice < 0.7:
            expected, kind = pool[w2 % pool.numel()], "random"
        else:
            expected, kind = original, "keep"
        assert torch.equal(ids.long(), expected), (where, kind)
        choices[kind] += 1
    assert all(v == {True, False} for v in seen.values()), seen  # both words occur, masked and not
    if replacement == "bert":
        assert min(choices.values()) >= 10, choices


# ----------------------------------------------------------------------------------------------------------------
# Randomness keys


def test_masks_are_keyed_by_seed_step_rank_row_column(tok, kjv_rows):
    x, vs = kjv_rows[0][:8], kjv_rows[1][:8]
    masker = make_masker(tok, strategy="uniform", mask_prob=0.5)
    a = masker(x, step=5, verse_start=vs).mask
    assert torch.equal(a, masker(x, step=5, verse_start=vs).mask)
    assert not torch.equal(a, masker(x, step=6, verse_start=vs).mask)
    assert not torch.equal(a, make_masker(tok, seed=99, strategy="uniform", mask_prob=0.5)(x, step=5).mask)
    other_rank = ConnectiveMasker.from_tokenizer(tok, seed=1234, rank=1, strategy="uniform", mask_prob=0.5, log=None)
    assert not torch.equal(a, other_rank(x, step=5, verse_start=vs).mask)
    # independent of batch composition: rows masked alone, with their row offset, match the full batch
    assert torch.equal(masker(x[:3], step=5, verse_start=vs[:3]).mask, a[:3])
    assert torch.equal(masker(x[3:], step=5, verse_start=vs[3:], row_offset=3).mask, a[3:])
    # and a row's mask does not depend on the other rows' tokens
    y = x.clone()
    y[0] = torch.flip(y[0], [0])
    assert torch.equal(masker(y, step=5, verse_start=vs).mask[1:], a[1:])
    # the decision itself, as docs/masking.md writes it: word 0 of the Philox draw at counter (start column, row,
    # step, rank) under key seed, as a uniform u; masked where u < p. The column is in it, and so is the row.
    decided = {}
    for b in range(len(x)):
        for start, _, _ in find_matches(x[b].tolist(), masker.lexicon):
            c = torch.tensor([start])
            w0 = philox4x32(masker.seed, c, torch.full_like(c, b), torch.full_like(c, 5), torch.zeros_like(c))[0]
            decided[b, start] = bool(uniform_from_bits(w0).item() < 0.5)
            assert bool(a[b, start]) == decided[b, start], (b, start)
    assert len(decided) >= 50 and 0.3 < sum(decided.values()) / len(decided) < 0.7


# ----------------------------------------------------------------------------------------------------------------
# Masking schedules


def test_schedule_factors():
    from genesis.curriculum import schedule_factor

    def factor(schedule, step, start=0.25, steps=8):
        return schedule_factor(SimpleNamespace(schedule=schedule, schedule_start=start, schedule_steps=steps), step)

    assert [factor("linear", s) for s in (0, 2, 4, 8, 9, 2**32 - 1)] == [0.25, 0.4375, 0.625, 1.0, 1.0, 1.0]
    assert factor("cosine", 0) == 0.25 and factor("cosine", 4) == 0.625 and factor("cosine", 8) == 1.0
    assert factor("cosine", 2) == pytest.approx(0.25 + 0.75 * 0.5 * (1 - math.cos(math.pi / 4)), abs=1e-7)
    assert factor("constant", 0, start=0.0) == 1.0
    assert factor("linear", 3, start=0.1, steps=7) == float(np.float32(0.1 + 0.9 * 3 / 7))  # float32, as multiplied


@pytest.mark.parametrize("strategy", ["uniform", "structural_weighted"])
def test_a_schedule_scales_every_probability_with_the_same_draws(base_masker, kjv_rows, strategy):
    """A linear ramp from 0.25 over 8 steps: at each step the masks are those of the constant masker with every
    probability x the factor — the same random draws, so a subset of the constant masker's masks at that step, at
    about the factor's share of them — and exactly the constant masker's from step 8 on. The kernel, reading the
    scaled table, agrees with the torch path mid-ramp."""
    x, vs = kjv_rows[0][:48], kjv_rows[1][:48]
    const = variant(base_masker, **STRATEGIES[strategy])
    ramp = variant(base_masker, **STRATEGIES[strategy], schedule="linear", schedule_start=0.25, schedule_steps=8)
    assert "x linear ramp 0.25 -> 1 over 8 steps" in ramp.describe()
    for step in (0, 4, 6, 8, 9, 0):  # back to step 0: the table follows the step, in either direction
        a, b = ramp(x, step, vs), const(x, step, vs)
        assert not (a.mask & ~b.mask).any(), step
        if step >= 8:
            assert_same(dataclasses.astuple(a), dataclasses.astuple(b), f"step {step}")
        else:
            share = a.mask.sum().item() / b.mask.sum().item()
            assert share == pytest.approx(ramp.schedule_factor(step), abs=0.08), step
    assert torch.equal(ramp.tables("cpu").prob_table, const.tables("cpu").prob_table * 0.25)
    if KERNEL_RUNS:
        small, small_vs = x[:2, :300].contiguous(), vs[:2, :300].contiguous()
        expected = dataclasses.astuple(ramp(small, 4, small_vs))
        ramp(small.to(KERNEL_DEVICE), 4, small_vs.to(KERNEL_DEVICE))  # a call scales that device's table too
        assert_same(kernel(ramp, small, 4, small_vs), expected, "kernel mid-ramp")


@pytest.mark.parametrize("copy", ["deepcopy", "pickle"])
def test_a_copied_masker_follows_its_schedule(base_masker, kjv_rows, copy):
    """A masker copied after it ran (a module deep-copied, a spawned worker) reads the table it scales: its numpy
    views are rebuilt on its own tensors, not carried over as copies of the original's."""
    import copy as copying
    import pickle

    x, vs = kjv_rows[0][:16], kjv_rows[1][:16]
    ramp = variant(base_masker, strategy="uniform", mask_prob=0.9, schedule="linear", schedule_start=0.1,
                   schedule_steps=100)
    fresh = variant(base_masker, strategy="uniform", mask_prob=0.9, schedule="linear", schedule_start=0.1,
                    schedule_steps=100)
    ramp(x, 0, vs)
    twin = copying.deepcopy(ramp) if copy == "deepcopy" else pickle.loads(pickle.dumps(ramp))
    for step in (50, 99, 100):
        assert torch.equal(twin(x, step, vs).mask, fresh(x, step, vs).mask), step


def test_a_schedule_without_steps_is_a_one_line_error(tok):
    with pytest.raises(MaskingError, match=r"^masking.schedule_steps: a cosine schedule needs schedule_steps >= 1 "
                                           r"\(got 0\)$"):
        make_masker(tok, schedule="cosine")
    with pytest.raises(MaskingError, match=r"^masking.schedule: must be one of constant, linear, cosine"):
        make_masker(tok, schedule="step")
    with pytest.warns(UserWarning, match=r'^masking.schedule_steps has no effect while masking.schedule = "constant"$'):
        make_masker(tok, schedule_steps=200)


def test_seed_comes_from_config_or_argument(tok):
    assert make_masker(tok, seed=7).seed == 7
    assert ConnectiveMasker.from_tokenizer(tok, {"seed": 11}, log=None).seed == 11


# ----------------------------------------------------------------------------------------------------------------
# Bad input and dispatch


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda: torch.tensor([[1, 2, 8000]]), r"ids outside the vocabulary \[0, 8000\): min 1, max 8000"),
        (lambda: torch.tensor([[-1, 2]]), "min -1"),
        (lambda: torch.zeros(2, 3), "must be int32 or int64"),
        (lambda: torch.zeros(2, 3, dtype=torch.int16), "must be int32 or int64"),
        (lambda: torch.zeros(5, dtype=torch.long), r"must be 2-D \(B, T\) \(got shape \(5,\)\)"),
        (lambda: torch.zeros(2, 3, 4, dtype=torch.long), "must be 2-D"),
        (lambda: [[1, 2]], "must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(tok, make_input, message):
    masker = make_masker(tok)
    with pytest.raises(ValueError, match=message):
        masker(make_input(), step=0)


def test_bad_verse_start_and_step(tok):
    masker = make_masker(tok)
    x = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(MaskingError, match=r"verse_start must have the shape of input_ids \(2, 3\) \(got \(3, 2\)\)"):
        masker(x, step=0, verse_start=torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(MaskingError, match="verse_start must be bool or integer"):
        masker(x, step=0, verse_start=torch.zeros(2, 3))
    with pytest.raises(MaskingError, match="step and row_offset must be in"):
        masker(x, step=-1)
    with pytest.raises(ValueError, match="masking.strategy: must be one of"):
        ConnectiveMasker.from_tokenizer(tok, strategy="chain")
    with pytest.raises(ValueError, match="masking.stratgy: unknown key"):
        ConnectiveMasker.from_tokenizer(tok, stratgy="uniform")


def test_empty_batches_return_empty_results(tok):
    masker = make_masker(tok)
    for shape in [(0, 4), (3, 0), (0, 0)]:
        out = masker(torch.zeros(shape, dtype=torch.long), step=0)
        assert out.input_ids.shape == out.mask.shape == out.classes.shape == shape


def test_targets_are_never_touched(tok, kjv_rows):
    """The masker returns a masked copy of the inputs; labels (with their -100s) are the caller's, untouched."""
    masker = make_masker(tok, strategy="uniform", mask_prob=1.0)
    x = kjv_rows[0][:2].clone()
    labels = torch.roll(x, -1, 1)
    labels[:, -1] = -100
    before_x, before_labels = x.clone(), labels.clone()
    out = masker(x, step=0)
    assert torch.equal(x, before_x) and torch.equal(labels, before_labels) and out.mask.any()


def test_dispatch(tok, monkeypatch):
    cpu = torch.device("cpu")
    logs = []
    assert choose_impl("torch", cpu) == "torch"
    assert choose_impl("auto", cpu, logs.append) == "torch" and len(logs) == 1 and "torch path" in logs[0]
    if INTERPRET:
        assert choose_impl("triton", cpu) == "triton"
    monkeypatch.setenv("GENESIS_MASK_IMPL", "torch")
    assert choose_impl("triton", cpu) == "torch"
    monkeypatch.setenv("GENESIS_MASK_IMPL", "cuda")
    with pytest.raises(MaskingError, match="GENESIS_MASK_IMPL"):
        choose_impl("auto", cpu)


def test_auto_falls_back_when_the_kernel_fails_on_its_first_call(tok, kjv_rows, monkeypatch):
    """A kernel that cannot compile (as happened on the first GPU run) must not end an 'auto' run: one log line,
    then the torch path. Asked for by name, the error is raised. (The failure is simulated: a real one needs a GPU
    whose Triton is broken.)"""
    import genesis.kernels.mask as kernel_module

    def broken(*args, **kwargs):
        raise RuntimeError("CompilationError: at 1:1:\nNameError('Cannot access global variable')")

    monkeypatch.setattr(kernel_module, "connective_mask_triton", broken)
    x = kjv_rows[0][:2, :200].contiguous()
    expected = make_masker(tok, impl="torch", strategy="uniform", mask_prob=0.5)(x, step=4)
    logs = []
    auto = ConnectiveMasker.from_tokenizer(tok, seed=1234, log=logs.append, impl="auto", strategy="uniform",
                                           mask_prob=0.5)
    auto._impl[x.device] = "triton"  # what 'auto' chooses on CUDA
    got = auto(x, step=4)
    assert torch.equal(got.input_ids, expected.input_ids) and torch.equal(got.mask, expected.mask)
    assert auto.impl(x.device) == "torch"
    assert len(logs) == 1 and "the Triton kernel failed" in logs[0] and "Cannot access global variable" in logs[0]
    named = make_masker(tok, impl="triton", strategy="uniform", mask_prob=0.5)
    named._impl[x.device] = "triton"
    with pytest.raises(RuntimeError, match="CompilationError"):
        named(x, step=4)


def test_asking_for_triton_where_it_cannot_run_says_why():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GENESIS_MASK_IMPL")}
    env["PYTHONPATH"] = str(ROOT)
    code = ("import torch; from genesis.masking import choose_impl\n"
            "try:\n    choose_impl('triton', torch.device('cpu'))\nexcept RuntimeError as e:\n    print(e)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "masking impl 'triton' cannot run" in proc.stdout and "needs a CUDA tensor" in proc.stdout, proc.stderr


@needs_kernel
def test_masker_runs_the_kernel_when_asked(tok, kjv_rows):
    x = kjv_rows[0][:1, :256].contiguous().to(KERNEL_DEVICE)
    via_kernel = make_masker(tok, impl="triton", strategy="uniform", mask_prob=0.5)
    via_torch = make_masker(tok, impl="torch", strategy="uniform", mask_prob=0.5)
    assert via_kernel.impl(x.device) == "triton"
    a, b = via_kernel(x, step=3), via_torch(x, step=3)
    assert_same((a.input_ids, a.mask, a.classes, a.connectives), (b.input_ids, b.mask, b.classes, b.connectives))


def test_transformers_fast_tokenizer_gives_the_same_masks(tok, kjv_rows):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, mask_token="[MASK]", pad_token="<pad>")
    x = kjv_rows[0][:4]
    a = make_masker(tok, strategy="uniform", mask_prob=0.5)(x, step=1)
    b = make_masker(hf, strategy="uniform", mask_prob=0.5)(x, step=1)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.mask, b.mask)


def test_report_and_describe(tok):
    masker = make_masker(tok, strategy="structural")
    report = masker.report()
    assert "therefore" in report and "Ġtherefore" in report and "Therefore" in report
    assert masker.describe().startswith("masking: structural (4 rules)")


# ----------------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU; each has a CPU twin above)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("replacement", list(REPLACEMENTS))
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_cuda_kernel_equals_torch_paths(tok, kjv_rows, strategy, replacement):
    masker = make_masker(tok, **STRATEGIES[strategy], **REPLACEMENTS[replacement])
    x, vs = kjv_rows[0][:16], kjv_rows[1][:16]
    # CPU twins: with chains test_kernel_equals_torch_with_chains, with readout (mask replacement only)
    # test_readout_kernel_equals_torch_and_the_oracle
    others = [variant(masker, chain=True)] + ([variant(masker, readout=True)] if replacement == "mask" else [])
    for other in (masker, *others):
        cpu = torch_path(other, x, 9, vs)
        xc, vc = x.cuda(), vs.cuda()
        for got in (kernel(other, xc, 9, vc, block=256), torch_path(other, xc, 9, vc)):
            assert_same(tuple(t.cpu() for t in got), cpu)


@needs_cuda
@pytest.mark.cuda
def test_cuda_bad_ids_raise_before_any_device_assert(tok):
    masker = make_masker(tok)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        masker(torch.tensor([[1, 99999]], device="cuda"), step=0)
    unchecked = make_masker(tok, check_ids=False, strategy="uniform", mask_prob=1.0)
    out = unchecked(torch.tensor([[1, 99999, -5]], device="cuda"), step=0)
    torch.cuda.synchronize()
    assert out.input_ids.tolist() == [[1, 99999, -5]]


# ----------------------------------------------------------------------------------------------------------------
# The control arm (strategy = "random")


@pytest.fixture(scope="module")
def control_masker(kjv_corpus):
    """The control arm of the default [masking] keys (reference: structural), calibrated on the training split as
    rows of 1024 tokens, the rows `kjv_rows` holds."""
    data = kjv_corpus.splits["train"]
    return ConnectiveMasker.control(kjv_corpus.tokenizer, {}, data.tokens, verse_start=data.verse_start,
                                    seq_len=1024, seed=1234, log=None)


def test_control_words_are_paired_by_training_frequency():
    """Greedy, most frequent connective first, closest count (ties: the larger, then alphabetical), never a lexicon
    word or its final-s form, alphabetic words only; a connective that never occurs gets no word."""
    from collections import Counter

    from genesis.control import pair_words

    counts = Counter({"for": 100, "but": 60, "so": 58, "fors": 99, "unto": 97, "lord": 103, "me": 59, "x1": 60,
                      "thee": 61, "abc": 61, "then": 0})
    pairs = pair_words(counts, ["for", "but", "so", "then", "afterward"])
    # for: unto and lord both 3 away, lord the more frequent ("fors" is a form of "for"); but: abc, thee and me 1
    # away, abc and thee the more frequent, abc first ("x1" is not alphabetic); so: me, the one left 1 away
    assert list(pairs.items()) == [("for", ("lord", 100, 103)), ("but", ("abc", 60, 61)), ("so", ("me", 58, 59))]


def test_the_control_arm_masks_control_words_never_connectives(base_masker, control_masker, kjv_rows):
    """Over the whole split at 4 steps: every masked position lies in a control-word match and never in a
    connective's; every control word that occurs is masked somewhere; the control words are no lexicon words."""
    arm, x, vs = control_masker.control_arm, *kjv_rows
    assert set(arm.pairs.values()).isdisjoint(DEFAULT_CONNECTIVES) and set(arm.pairs) <= set(DEFAULT_CONNECTIVES)
    assert control_masker.lexicon.words == tuple(arm.pairs.values()) and not control_masker.lexicon.unresolved
    connective = base_masker(x, step=0, verse_start=vs).matched  # every connective piece, masked or not
    masked_entries = set()
    for step in range(100, 104):
        out = control_masker(x, step=step, verse_start=vs)
        assert out.mask.any() and not (out.mask & connective).any()
        assert not (out.mask & ~out.matched).any()
        masked_entries |= set(out.connectives[out.mask].tolist())
        stats = control_masker.stats(out, x)
        assert stats["masked_connective_words"] == 0 and stats["connective_words"] > 10_000
        assert 0 < stats["masked_words"] < stats["matched_words"]
    occurring = set(torch.unique(control_masker(x, step=0).connectives[control_masker(x, step=0).mask]).tolist())
    assert occurring <= masked_entries and len(masked_entries) == len(arm.pairs)


def match_lengths(out, tables, x):
    """The piece count of every match in a masker's output (a match's first piece never glues onto the token before
    it; its other pieces do)."""
    ids = x.reshape(-1)
    matched = out.matched.reshape(-1).numpy()
    glued = np.zeros_like(matched)
    glued[1:] = (tables.glue_left[ids[1:]] & tables.word_end[ids[:-1]]).numpy()
    glued[:: x.shape[1]] = False  # row starts
    word = np.cumsum(matched & ~glued)[matched]
    return np.bincount(word)[1:]


def test_the_control_arm_masks_at_the_reference_rate(control_masker, kjv_rows):
    """The realised rate over the split's rows at 8 steps the calibration never drew (100..107) matches the
    reference's (structural, with the same keys) at the same steps, within 5 sigma of the difference's Bernoulli
    noise: the control's is exact (each control match of n pieces adds n^2 p (1 - p)), the reference's bounded by
    n^2 / 4 per match (p (1 - p) <= 1/4), and the calibration's mean over CALIBRATION_STEPS adds the reference's
    / CALIBRATION_STEPS. At ~8,300 masked tokens a step, 5 sigma is ~3% of the rate; a mismatched p is not."""
    from genesis.control import CALIBRATION_STEPS

    arm, (x, vs) = control_masker.control_arm, kjv_rows
    reference = variant(control_masker, strategy="structural")  # for the tables only: its lexicon is the controls'
    reference = ConnectiveMasker(control_masker.reference_lexicon, reference.config, control_masker.mask_id,
                                 seed=control_masker.seed, log=None)
    steps = range(100, 108)
    control_outs = [control_masker(x, step=s, verse_start=vs) for s in steps]
    reference_outs = [reference(x, step=s, verse_start=vs) for s in steps]
    control_rate = sum(int(o.mask.sum()) for o in control_outs) / len(steps)
    reference_rate = sum(int(o.mask.sum()) for o in reference_outs) / len(steps)
    p = arm.probability
    var_control = float((match_lengths(control_outs[0], control_masker.tables("cpu"), x) ** 2).sum()) * p * (1 - p)
    var_reference = float((match_lengths(reference_outs[0], reference.tables("cpu"), x) ** 2).sum()) / 4
    sigma = math.sqrt(var_control / len(steps) + var_reference / len(steps) + var_reference / CALIBRATION_STEPS)
    assert abs(control_rate - reference_rate) < 5 * sigma, (control_rate, reference_rate, sigma)
    assert abs(control_rate - p * arm.control_tokens) < 5 * math.sqrt(var_control / len(steps))
    assert 5 * sigma < 0.04 * reference_rate  # the bound can tell a 4% mismatch
    assert arm.tokens == x.numel() and arm.expected_rate == pytest.approx(arm.reference_rate, rel=1e-9)


def test_the_control_arm_is_deterministic_and_caps_p_with_a_warning(kjv_corpus):
    """The same tokens and keys give the same words and p; a reference that masks more tokens than the control
    words hold (every "the", paired with the rarer "and") caps p at 1 with one warning line."""
    data = kjv_corpus.splits["train"]
    tokens = np.asarray(data.tokens[:200_000])
    keys = dict(strategy="random", control_reference="uniform", mask_prob=1.0, default_connectives=False,
                connectives={"the": (1.0, "additive")})
    said = []
    masker = ConnectiveMasker.control(kjv_corpus.tokenizer, keys, tokens, seq_len=100, log=None, warn=said.append)
    again = ConnectiveMasker.control(kjv_corpus.tokenizer, keys, tokens, seq_len=100, log=None, warn=said.append)
    arm = masker.control_arm
    assert arm.pairs == again.control_arm.pairs == {"the": "and"} and arm.probability == 1.0 and arm.capped
    assert masker.config.mask_prob == 1.0 and arm.expected_rate < arm.reference_rate
    assert len(said) == 2 and said[0] == said[1] and "too rare to reach uniform's rate" in said[0]
    assert "\n" not in said[0]


def test_the_random_strategy_needs_the_training_tokens(tok):
    with pytest.raises(MaskingError, match=r"strategy 'random' \(the control arm\) picks its words .* "
                                           r"ConnectiveMasker.control\(tokenizer, config, tokens"):
        make_masker(tok, strategy="random")
    with pytest.raises(MaskingError, match="adaptive: adapts the connectives' weights"):
        ConnectiveMasker.control(tok, {"adaptive": True}, np.zeros(10, dtype=np.int64), seq_len=4, log=None)
    with pytest.raises(MaskingError, match=r"tokens must be 1-D token ids"):
        ConnectiveMasker.control(tok, {}, np.zeros((2, 10), dtype=np.int64), seq_len=4, log=None)


@needs_kernel
@pytest.mark.parametrize("replacement", list(REPLACEMENTS))
def test_control_kernel_equals_torch_on_kjv_batches(control_masker, kjv_rows, replacement):
    """As test_kernel_equals_torch_on_kjv_batches, for the control masker at a denser p, as STRATEGIES' uniform
    (torch_path also checks the dense layout against the sparse one)."""
    masker = variant(control_masker, **REPLACEMENTS[replacement], mask_prob=0.7)
    x, vs = kjv_rows
    x, vs = x[3:5, 100:400].contiguous(), vs[3:5, 100:400].contiguous()
    for verse_start in (vs, None):
        expected = torch_path(masker, x, 17, verse_start)
        assert expected[1].any()
        assert_same(kernel(masker, x, 17, verse_start, block=128), expected)


@needs_kernel
@pytest.mark.parametrize("replacement", list(REPLACEMENTS))
def test_control_kernel_equals_torch_on_adversarial_batches(control_masker, replacement):
    """As test_kernel_equals_torch_on_adversarial_batches: rows built from the control words' patterns."""
    masker = variant(control_masker, **REPLACEMENTS[replacement], lookback=12, mask_prob=0.7)
    x = adversarial_batch(masker, (2, 193), seed=11)
    vs = torch.from_numpy(np.random.default_rng(11).random((2, 193)) < 0.1)
    for verse_start in (vs, None):
        expected = torch_path(masker, x, 3, verse_start, row_offset=5)
        assert expected[1].sum() > 10
        assert_same(kernel(masker, x, 3, verse_start, row_offset=5, block=64), expected)


@needs_kernel
def test_control_kernel_equals_torch_on_odd_shapes(control_masker):
    """ODD_CASES (B=1, T=1, T not a multiple of the block, int32 ids) for the control masker."""
    single = [p[0] for p in map(control_masker.lexicon.pattern_ids, range(control_masker.lexicon.num_patterns))
              if len(p) == 1]
    masked = 0
    for i, (shape, dtype, replacement, flags, block) in enumerate(ODD_CASES):
        masker = variant(control_masker, **REPLACEMENTS[replacement], mask_prob=0.9)
        x = torch.tensor(single[i:i + shape[0]]).view(shape) if shape[1] == 1 else adversarial_batch(masker, shape, i)
        x = x.to(dtype)
        vs = torch.from_numpy(np.random.default_rng(i).random(shape) < 0.3) if flags else None
        label = f"random: {shape} {dtype} {replacement} verse_start={flags} block={block}"
        got, expected = kernel(masker, x, 2, vs, block=block), torch_path(masker, x, 2, vs)
        assert_same(got, expected, label)
        masked += int(expected[1].sum())
    assert masked > 10


def test_stats_count_the_lexicon_words_of_the_batch_masked_or_not(base_masker, kjv_rows):
    """matched_words (logged as connective_words) is the oracle's match count, whatever was masked."""
    x, vs = kjv_rows
    x, vs = x[10:14], vs[10:14]
    out = base_masker(x, step=3, verse_start=vs)
    stats = base_masker.stats(out, x)
    assert int(stats["matched_words"]) == sum(len(find_matches(row, base_masker.lexicon)) for row in x.tolist())
    assert 0 < int(stats["masked_words"]) < int(stats["matched_words"])
    assert "connective_words" not in stats  # the real connectives' counts are the control arm's alone


# ----------------------------------------------------------------------------------------------------------------
# Readout targets (masking.readout)


def readout_oracle(masker, x, verse_start, mask, connectives):
    """`readout_reference` row by row, as (B, T) tensors: (readout, readout_start)."""
    tables = masker.tables("cpu")
    rows = [readout_reference(x[b].tolist(), mask[b].tolist(), connectives[b].tolist(), tables,
                              None if verse_start is None else verse_start[b].tolist()) for b in range(x.shape[0])]
    return tuple(torch.tensor([r[i] for r in rows], dtype=torch.int64).view(tuple(x.shape)) for i in (0, 1))


def check_readout(masker, x, step, verse_start=None, block=64, label=""):
    """Kernel (both versions) == sparse == dense on all seven outputs, and the readout == the one-word-at-a-time
    oracle on the torch path's masks. Returns the torch path's outputs."""
    expected = torch_path(masker, x, step, verse_start)
    assert len(expected) == 7, label
    assert_same(expected[:5] + readout_oracle(masker, x, verse_start, expected[1], expected[3]), expected,
                f"{label}: the oracle vs the torch path")
    if KERNEL_RUNS:
        assert_same(kernel(masker, x, step, verse_start, block=block), expected, f"{label}: kernel vs torch")
    return expected


def sparse_stop_rows(masker, shape, seed):
    """Rows of plain words and one-token connectives with a stop only every ~40 tokens: readout positions lie
    blocks after their words, runs of several stops follow some words, and rows end before their last stop."""
    lex = masker.lexicon
    stops = np.flatnonzero(lex.clause_boundary | lex.verse_separator)
    words = np.flatnonzero(~(lex.clause_boundary | lex.verse_separator | lex.special) & ~lex.glue_left)
    single = [p[0] for p in map(lex.pattern_ids, range(lex.num_patterns)) if len(p) == 1]
    rng = np.random.default_rng(seed)
    kind = rng.random(shape)
    rows = np.where(kind < 0.15, rng.choice(single, shape), rng.choice(words, shape))
    return torch.from_numpy(np.where(kind > 0.975, rng.choice(stops, shape), rows).astype(np.int64))


@needs_kernel
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_readout_kernel_equals_torch_and_the_oracle(tok, base_masker, kjv_rows, strategy):
    """out.readout / readout_start: kernel (v1, v2) == sparse == dense == the oracle on KJV rows, adversarial
    batches, rows whose readout lies blocks after the word or past the row end; with and without verse_start. The
    first five outputs are the ones the masker gives without readout. The shapes that test the kernel's edges
    (ODD_CASES: B=1, T=1, T not a multiple of the block, int32 ids; empty batches) run with structural, the strategy
    the readout trains with: where a readout lies depends on the mask, not on how it was chosen, and every strategy
    runs those shapes without readout in test_kernel_equals_torch_on_odd_shapes_every_strategy."""
    masker = variant(base_masker, **dense(strategy), replacement="mask", readout=True)
    plain = variant(base_masker, **dense(strategy), replacement="mask")
    x, vs = kjv_rows
    rng = np.random.default_rng(11)
    batches = [("kjv", x[3:5, 100:400].contiguous(), vs[3:5, 100:400].contiguous(), 128),
               ("adversarial", adversarial_batch(masker, (2, 193), seed=4), True, 64),
               ("sparse stops", sparse_stop_rows(masker, (3, 300), seed=5), True, 32)]
    if strategy == "structural":
        for i, (shape, dtype, _, flags, block) in enumerate(ODD_CASES):
            batches.append((f"{shape} {dtype}", adversarial_batch(masker, shape, seed=i).to(dtype), flags, block))
        batches += [("(0, 5)", torch.zeros(0, 5, dtype=torch.int64), None, 32),
                    ("(4, 0)", torch.zeros(4, 0, dtype=torch.int64), None, 32)]
    counts = dict.fromkeys(("readout_targets", "readout_shared", "readout_dropped"), 0)
    for name, x, flags, block in batches:
        random_flags = torch.from_numpy(rng.random(tuple(x.shape)) < 0.1)
        flag_choices = [flags, None] if isinstance(flags, torch.Tensor) else [random_flags, None] if flags else [None]
        for verse_start in flag_choices:
            label = f"{strategy}/{name}, verse_start {'given' if verse_start is not None else 'None'}"
            got = check_readout(masker, x, 3, verse_start, block=block, label=label)
            assert_same(got[:5], mask_torch(x, verse_start, plain.tables("cpu"), plain.seed, 3), label)
            for key, value in masker.stats(MaskOutput(*got), x).items():
                counts[key] = counts.get(key, 0) + int(value)
    assert counts["readout_targets"] > 50 and counts["readout_shared"] > 5 and counts["readout_dropped"] > 5, counts
    assert counts["readout_targets"] + counts["readout_shared"] + counts["readout_dropped"] == counts["masked_words"]


def encode_row(tok, text):
    return torch.tensor([tok.encode(text).ids])


@pytest.mark.parametrize("layout", ["sparse", "dense", "kernel"])
def test_readout_positions_follow_the_definition(tok, base_masker, layout):
    """Worked rows: the readout is at the stop after what follows the word, not at a comma right after it; a word
    whose stop lies past the row's end has none; two words that share a position: the later wins; a verse's last
    column is a stop when verse_start flags come with the batch. The stats count every masked word once."""
    if layout == "kernel" and not KERNEL_RUNS:
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU")
    masker = variant(base_masker, strategy="uniform", mask_prob=1.0, readout=True)
    entry = {word: base_masker.lexicon.words.index(word) for word in ("wherefore", "for", "therefore", "but")}

    def run(text, verse_start=None):
        x = encode_row(tok, text)
        if layout == "kernel":
            out = kernel(masker, x, 0, verse_start, block=32)
        else:
            out = mask_torch(x, verse_start, masker.tables("cpu"), masker.seed, 0, layout=layout)
        stats = masker.stats(MaskOutput(*out), x)
        written = {int(c): (int(out[5][0, c]), int(out[6][0, c])) for c in torch.nonzero(out[5][0] >= 0).flatten()}
        counts = tuple(int(stats[k]) for k in ("readout_targets", "readout_shared", "readout_dropped"))
        return x, written, counts

    x, written, counts = run("Wherefore, ye shall live.")
    assert written == {x.shape[1] - 1: (entry["wherefore"], 1)} and counts == (1, 0, 0)  # at ".", not ","
    x, written, counts = run("For therefore ye shall live; but ye")
    semicolon = x[0].tolist().index(tok.token_to_id(";"))
    assert written == {semicolon: (entry["therefore"], 2)} and counts == (1, 1, 1)  # "For" shares; "but" dropped
    x, written, counts = run("For ye shall live,;.")
    assert written == {x.shape[1] - 3: (entry["for"], 1)} and counts == (1, 0, 0)  # the run's first stop
    x, written, counts = run("ye shall live, for.")
    assert written == {} and counts == (0, 0, 1)  # only stops follow "for" before the row's end
    x, written, counts = run("And ye live for ye live but")
    assert [tok.id_to_token(i) for i in x[0].tolist()] == ["And", "Ġye", "Ġlive", "Ġfor", "Ġye", "Ġlive", "Ġbut"]
    assert written == {} and counts == (0, 0, 2)
    verse_start = torch.zeros(x.shape, dtype=torch.bool)
    verse_start[0, 6] = True  # "for ye live | but": "live" ends a verse
    x, written, counts = run("And ye live for ye live but", verse_start)
    assert written == {5: (entry["for"], 4)} and counts == (1, 0, 1)


def test_readout_position_reference():
    """The plain-Python definition on hand-made rows (0: a word, 1: a stop)."""
    stop = [False, True]
    assert readout_position([0, 0, 0, 1], 0, stop) == 3
    assert readout_position([0, 1, 0, 0, 1], 0, stop) == 4  # the stop right after the word is skipped
    assert readout_position([0, 1, 1, 0, 1, 1], 0, stop) == 4
    assert readout_position([0, 1, 1], 0, stop) is None  # nothing but stops after the word
    assert readout_position([0, 0, 0], 0, stop) is None  # no stop before the row's end
    assert readout_position([0, 0, 0], 2, stop) is None
    assert readout_position([0, 0, 0, 0], 0, stop, verse_start=[0, 0, 0, 1]) == 2  # column 2 ends a verse
    assert readout_position([0, 0, 0, 0], 0, stop, verse_start=[0, 0, 1, 0]) is None  # column 1: a stop run
    assert readout_position([0, 0, 0, 0], 0, stop, verse_start=[0, 1, 0, 1]) == 2  # the word ends the verse


@pytest.mark.parametrize("layout", ["sparse", "dense"])
def test_readout_stats_count_every_masked_word_once(base_masker, kjv_rows, layout):
    """readout_targets + readout_shared + readout_dropped == masked_words, each as the oracle counts it."""
    masker = variant(base_masker, strategy="uniform", mask_prob=0.8, readout=True)
    x, vs = kjv_rows
    x, vs = x[20:28], vs[20:28]
    tables = masker.tables("cpu")
    out = mask_torch(x, vs, tables, masker.seed, 9, layout=layout)
    stats = masker.stats(MaskOutput(*out), x)
    positions, words = [], 0
    stop = tables.clause_stop.tolist()
    for b in range(x.shape[0]):
        row, mask, entry = x[b].tolist(), out[1][b].tolist(), out[3][b].tolist()
        for c in range(len(row)):
            last = mask[c] and not (c + 1 < len(row) and mask[c + 1] and entry[c + 1] == entry[c]
                                    and tables.glue_left[row[c + 1]] and tables.word_end[row[c]])
            if last:
                words += 1
                positions.append((b, readout_position(row, c, stop, vs[b].tolist())))
    found = [p for p in positions if p[1] is not None]
    assert int(stats["masked_words"]) == words > 100
    assert int(stats["readout_targets"]) == len(set(found)) == int((out[5] >= 0).sum())
    assert int(stats["readout_dropped"]) == len(positions) - len(found)
    assert int(stats["readout_shared"]) == len(found) - len(set(found)) > 0
