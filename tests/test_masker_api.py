"""The masker's public API as a plug-in: every bad argument is a MaskingError (a ValueError) naming it, raised
before any work; a disabled config passes batches through; the connective forms, the impl switch, the mask-token
advice. (tests/test_masking.py checks what the masks are.)"""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from genesis.config import MaskingConfig
from genesis.masking import ConnectiveMasker, MaskingError, choose_impl, requested_impl
from genesis.tokenizer import TokenizerError, find_mask_id

from .helpers import ROOT

# A small lexicon keeps each from_tokenizer call short (resolving the default one takes ~1 s).
FEW = dict(default_connectives=False, connectives={"for": {"weight": 0.6, "class": "causal"},
                                                   "but": {"weight": 0.3, "class": "contrastive"}})


@pytest.fixture(scope="module")
def tok(kjv_tokenizer):
    return kjv_tokenizer


@pytest.fixture(scope="module")
def masker(tok):
    return ConnectiveMasker.from_tokenizer(tok, seed=1234, log=None, strategy="uniform", mask_prob=0.5, **FEW)


@pytest.fixture(scope="module")
def rows(kjv_corpus):
    tokens = np.asarray(kjv_corpus.splits["train"].tokens[: 4 * 256]).astype(np.int64)
    return torch.from_numpy(tokens).view(4, 256)


def again(masker, **kwargs):
    """A masker with `masker`'s lexicon and config (no second resolve) and other constructor arguments."""
    args = dict(seed=masker.seed, rank=masker.rank, log=None) | kwargs
    return ConnectiveMasker(masker.lexicon, masker.config, masker.mask_id, **args)


def _word_level(specials):
    vocab = {w: i for i, w in enumerate(["the", "for", "but", *specials])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(specials)
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------
# rank, step, row_offset and seed: integers in the range of their Philox words


@pytest.mark.parametrize("rank", [2**32, -1, "1", 1.0, True, None])
def test_bad_rank_raises_at_construction(masker, tok, rank):
    with pytest.raises(MaskingError, match=r"rank must be"):
        again(masker, rank=rank)
    with pytest.raises(MaskingError, match=r"rank must be"):
        ConnectiveMasker.from_tokenizer(tok, rank=rank, log=None, **FEW)


@pytest.mark.parametrize("rank", [2**32, -1, "1", 1.0, False])
def test_bad_rank_raises_when_set(masker, rows, rank):
    """The README's examples set masker.rank directly: 2**32 used to draw rank 0's masks, "1" a late TypeError."""
    m = again(masker, rank=3)
    with pytest.raises(MaskingError, match=r"rank must be"):
        m.rank = rank
    assert m.rank == 3  # unchanged
    m(rows, step=1)


def test_rank_accepts_integer_scalars(masker, rows):
    expected = again(masker, rank=2**32 - 1)(rows, step=1).mask
    for rank in (np.uint32(2**32 - 1), np.int64(2**32 - 1), torch.tensor(2**32 - 1)):
        m = again(masker)
        m.rank = rank
        assert type(m.rank) is int and torch.equal(m(rows, step=1).mask, expected)
    assert not torch.equal(again(masker, rank=0)(rows, step=1).mask, expected)


@pytest.mark.parametrize("name, value", [
    ("step", 1.9), ("step", True), ("step", "5"), ("step", None), ("step", np.float64(1.0)),
    ("step", torch.tensor(1.5)), ("step", torch.tensor([1, 2])), ("step", torch.tensor(True)),
    ("row_offset", 2.5), ("row_offset", False), ("row_offset", "0"),
])
def test_step_and_row_offset_must_be_integers(masker, rows, name, value):
    kwargs = {"step": 1, name: value}
    with pytest.raises(MaskingError, match=rf"{name} must be an integer"):
        masker(rows, **kwargs)


def test_step_and_row_offset_accept_integer_scalars(masker, rows):
    expected = masker(rows, step=7, row_offset=3)
    for step, row_offset in [(np.int64(7), np.uint32(3)), (torch.tensor(7), torch.tensor(3, dtype=torch.int32))]:
        got = masker(rows, step=step, row_offset=row_offset)
        assert torch.equal(got.mask, expected.mask) and torch.equal(got.input_ids, expected.input_ids)


def test_step_on_the_meta_device_is_a_masking_error(masker, rows):
    with pytest.raises(MaskingError, match=r"step is a tensor on the meta device"):
        masker(rows, step=torch.tensor(5, device="meta"))
    with pytest.raises(MaskingError, match=r"row_offset is a tensor on the meta device"):
        masker(rows, step=5, row_offset=torch.tensor(0, device="meta"))


@pytest.mark.parametrize("device, message", [
    ("bogus", r"^'bogus': not a torch device \(RuntimeError: Expected one of cpu, cuda"),
    ("tpu", r"^'tpu': not a torch device \("),
    (3.5, r"^3\.5: not a torch device \(TypeError: "),
    ("cuda", r"^cuda: CUDA is not available to this torch "),
    ("mps", r"^mps: this torch \(.*\) cannot use it \("),
    ("xpu", r"^xpu: this torch \(.*\) cannot use it \("),
])
def test_to_an_unknown_or_unavailable_device_is_a_masking_error(masker, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    if device == "xpu" and getattr(torch, "xpu", None) is not None and torch.xpu.is_available():
        pytest.skip("this machine has an XPU")
    with pytest.raises(MaskingError, match=message):
        again(masker).to(device)


def test_row_offset_plus_rows_must_not_wrap_past_2_to_the_32(masker, rows):
    """Row 1 at row_offset 2**32 - 1 would draw with counter word 0: the masks of row 0 at row_offset 0."""
    with pytest.raises(MaskingError, match=r"row_offset \+ rows must be <= 2\*\*32.*=4294967295 with 2 rows"):
        masker(rows[:2], step=5, row_offset=2**32 - 1)
    masker(rows[:1], step=5, row_offset=2**32 - 1)  # the last row counter word itself is fine
    masker(rows[:0], step=5, row_offset=2**32 - 1)


@pytest.mark.parametrize("seed", [1.5, True, "3", -1, 2**63, None])
def test_bad_seed_raises(masker, tok, seed):
    with pytest.raises(MaskingError, match=r"seed must be"):
        again(masker, seed=seed)
    if seed is not None:  # seed=None means "from the config" in from_tokenizer
        with pytest.raises(MaskingError, match=r"seed must be"):
            ConnectiveMasker.from_tokenizer(tok, seed=seed, log=None, **FEW)


def test_seed_accepts_integer_scalars(masker):
    assert again(masker, seed=np.int64(7)).seed == 7 and type(again(masker, seed=np.int64(7)).seed) is int


# ----------------------------------------------------------------------------------------------------------------
# from_tokenizer's arguments


@pytest.mark.parametrize("config, hint", [
    ("structural", r"to choose a strategy, pass strategy='structural'"),
    ("chain", r"to choose a strategy, pass strategy='uniform', 'weighted' or 'structural'"),
    (5, r"got int 5"),
    ([("strategy", "uniform")], r"got list"),
])
def test_config_must_be_a_masking_config_or_a_mapping(tok, config, hint):
    with pytest.raises(MaskingError, match=r"config must be a MaskingConfig or a mapping of \[masking\] keys") as e:
        ConnectiveMasker.from_tokenizer(tok, config, log=None)
    assert e.match(hint)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask_token=3), r"mask_token must be a str"),
    (dict(check_ids="yes"), r"check_ids must be True or False"),
    (dict(log="print"), r"log must be a callable or None"),
])
def test_other_bad_arguments_name_themselves(tok, kwargs, message):
    with pytest.raises(MaskingError, match=message):
        ConnectiveMasker.from_tokenizer(tok, **FEW, **kwargs)


def test_connectives_take_weight_class_pairs_as_the_default_lexicon_does(tok):
    forms = {"hence": (0.9, "causal"), "whereas": [0.4, "contrastive"], "then": {"weight": 0.3, "class": "temporal"}}
    m = ConnectiveMasker.from_tokenizer(tok, default_connectives=False, connectives=forms, log=None)
    assert m.lexicon.words == ("hence", "whereas", "then")
    assert m.lexicon.entry_weight.tolist() == pytest.approx([0.9, 0.4, 0.3])
    from_table = ConnectiveMasker.from_tokenizer(tok, {"default_connectives": False, "connectives": forms}, log=None)
    assert from_table.lexicon.words == m.lexicon.words
    with_defaults = ConnectiveMasker.from_tokenizer(tok, connectives={"hence": (0.9, "causal")}, log=None)
    assert "hence" in with_defaults.lexicon.words and "therefore" in with_defaults.lexicon.words


def test_dataclass_values_are_taken_as_their_tables(tok):
    from genesis.config import ConnectiveEntry, MaskRule

    m = ConnectiveMasker.from_tokenizer(tok, {"connectives": {"hence": ConnectiveEntry(0.9, "causal")}}, log=None,
                                        strategy="structural", rules=[MaskRule(p=0.5, verse_initial=True)],
                                        default_connectives=False)
    assert m.lexicon.words == ("hence",) and m.config.rules == [MaskRule(p=0.5, verse_initial=True)]


@pytest.mark.parametrize("value, message", [
    ((0.9,), r"masking.connectives.hence: expected a \(weight, class\) pair or a table \{weight = .., class = ..\}"),
    (0.9, r"masking.connectives.hence: expected a \(weight, class\) pair"),
    (("causal", 0.9), r"masking.connectives.hence.weight: expected a number"),
    ((0.9, "causl"), r"masking.connectives.hence.class: must be one of"),
])
def test_bad_connective_forms_say_what_is_accepted(tok, value, message):
    with pytest.raises(MaskingError, match=message):
        ConnectiveMasker.from_tokenizer(tok, default_connectives=False, connectives={"hence": value}, log=None)


# ----------------------------------------------------------------------------------------------------------------
# enabled = false: a pass-through


@pytest.mark.parametrize("how", ["keyword", "table"])
def test_disabled_config_passes_batches_through(tok, rows, how):
    settings = dict(strategy="uniform", mask_prob=1.0, **FEW)
    logs = []
    if how == "keyword":
        m = ConnectiveMasker.from_tokenizer(tok, enabled=False, log=logs.append, **settings)
    else:
        m = ConnectiveMasker.from_tokenizer(tok, {"enabled": False, **settings}, log=logs.append)
    assert not m.enabled and len(logs) == 1 and "disabled" in logs[0]
    assert m.describe().startswith("masking: disabled (enabled = false)")
    assert m.report().splitlines()[0].startswith("masking is disabled (enabled = false)")
    assert ConnectiveMasker.from_tokenizer(tok, enabled=True, log=None, **settings)(rows, step=0).mask.any()
    for x in (rows, rows.int(), rows[:, ::2], rows[:0]):
        out = m(x, step=0, verse_start=torch.zeros_like(x, dtype=torch.bool))
        assert out.input_ids.dtype == x.dtype and torch.equal(out.input_ids, x) and out.input_ids is not x
        assert out.mask.dtype == torch.bool and out.mask.shape == x.shape and not out.mask.any()
        for labels in (out.classes, out.connectives):
            assert labels.dtype == torch.int64 and labels.shape == x.shape and (labels == -100).all()
        assert {t.device for t in (out.input_ids, out.mask, out.classes, out.connectives)} == {x.device}
        assert int(m.stats(out, x)["masked_tokens"]) == 0
    with pytest.raises(MaskingError, match="outside the vocabulary"):  # still checks its input
        m(torch.tensor([[10**6]]), step=0)
    with pytest.raises(MaskingError, match="step must be an integer"):
        m(rows, step=0.5)


def test_enabled_counts_only_where_given(tok, rows):
    """MaskingConfig's default enabled = false is the trainer's switch (genesis.train builds no masker then); a
    masker built without saying `enabled` masks, whatever the MaskingConfig instance holds."""
    settings = dict(strategy="uniform", mask_prob=1.0, **FEW)
    assert ConnectiveMasker.from_tokenizer(tok, log=None, **settings).enabled
    from_instance = ConnectiveMasker.from_tokenizer(tok, MaskingConfig(enabled=False), log=None, **settings)
    assert from_instance.enabled and from_instance(rows, step=0).mask.any()
    with pytest.raises(MaskingError, match="masking.enabled: expected true or false"):
        ConnectiveMasker.from_tokenizer(tok, enabled="no", log=None, **settings)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch


@pytest.mark.parametrize("env, expected", [("TORCH", "torch"), (" torch\n", "torch"), ("Torch", "torch"),
                                           ("  ", "torch"), ("AUTO", "torch")])
def test_env_impl_is_case_and_space_insensitive(monkeypatch, env, expected):
    monkeypatch.setenv("GENESIS_MASK_IMPL", env)
    assert choose_impl("torch", torch.device("cpu")) == expected
    assert requested_impl("torch") == (env.strip().lower() or "torch")


def test_bad_env_impl_names_the_variable(monkeypatch):
    monkeypatch.setenv("GENESIS_MASK_IMPL", " CUDA ")
    with pytest.raises(MaskingError, match=r"got ' CUDA ', from GENESIS_MASK_IMPL"):
        choose_impl("auto", torch.device("cpu"))


def test_triton_where_it_cannot_run_is_a_masking_error(monkeypatch):
    """One exception type for callers; still a RuntimeError, as before, for handlers written against that."""
    monkeypatch.delenv("GENESIS_MASK_IMPL", raising=False)
    with pytest.raises(MaskingError, match=r"masking impl 'triton' cannot run: .*got a meta tensor") as e:
        choose_impl("triton", torch.device("meta"))
    assert isinstance(e.value, RuntimeError)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(MaskingError, match=r"masking impl 'triton' cannot run"):
        choose_impl("triton", torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------------------
# Input tensors


def test_meta_tensors_raise_a_masking_error_naming_the_device(masker):
    x = torch.zeros(2, 3, dtype=torch.long, device="meta")
    for m in (masker, again(masker, check_ids=False)):
        with pytest.raises(MaskingError, match=r"input_ids is on the meta device"):
            m(x, step=1)


def test_sparse_tensors_raise_a_masking_error_naming_the_layout(masker, rows):
    with pytest.raises(MaskingError, match=r"input_ids must be a dense \(strided\) tensor \(got layout torch.sparse"):
        masker(rows.to_sparse(), step=1)
    flags = torch.zeros(rows.shape, dtype=torch.bool)
    with pytest.raises(MaskingError, match=r"verse_start must be a dense \(strided\) tensor"):
        masker(rows, step=1, verse_start=flags.to_sparse())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_to_cuda_without_cuda_is_a_masking_error(masker):
    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(MaskingError, match=r"CUDA is not available"):
            again(masker).to(device)
    with pytest.raises(MaskingError, match=r"CUDA is not available"):
        again(masker).tables("cuda")


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.uint16, torch.int8, torch.float32, torch.bool])
def test_only_int32_and_int64_ids_are_accepted_as_the_docs_say(masker, dtype):
    with pytest.raises(MaskingError, match=rf"input_ids must be int32 or int64 \(got {dtype}\)"):
        masker(torch.zeros(2, 3, dtype=dtype), step=0)
    semantics = (ROOT / "docs" / "masking.md").read_text(encoding="utf-8")
    bad_input = semantics[semantics.index("- **Bad input**"):].split("\n\n")[0]  # the bullet
    assert "non-integer dtypes" not in bad_input and "`int32`/`int64`" in bad_input and "`uint16`" in bad_input


# ----------------------------------------------------------------------------------------------------------------
# The mask token


def test_missing_mask_token_advice_fits_a_tokenizers_tokenizer():
    tokenizer = _word_level(["<pad>"])
    with pytest.raises(TokenizerError) as e:
        find_mask_id(tokenizer)
    message = str(e.value)
    assert "tokenizer.add_special_tokens(['[MASK]'])" in message and "mask_token=" in message
    assert "set tokenizer.mask_token" not in message  # a tokenizers.Tokenizer has no such attribute
    tokenizer.add_special_tokens(["[MASK]"])  # the advice works
    assert find_mask_id(tokenizer) == 4
    with pytest.raises(TokenizerError, match=r"has no token '<m>'.*tokenizer.add_special_tokens\(\['<m>'\]\)"):
        find_mask_id(tokenizer, "<m>")


def test_missing_mask_token_advice_fits_a_transformers_tokenizer():
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=_word_level(["<pad>"]))
    with pytest.raises(TokenizerError) as e:
        find_mask_id(hf)
    assert "tokenizer.add_special_tokens({'mask_token': '[MASK]'})" in str(e.value)
    with pytest.raises(TokenizerError, match=r"tokenizer.add_special_tokens\(\{'mask_token': '<m>'\}\)"):
        find_mask_id(hf, "<m>")
    hf.mask_token = "<m>"  # set, but not in the vocabulary
    with pytest.raises(TokenizerError, match=r"tokenizer.mask_token is '<m>', which is not in its vocabulary"):
        find_mask_id(hf)
    hf.add_special_tokens({"mask_token": "[MASK]"})  # the advice works
    assert find_mask_id(hf) == 4


def test_tokenizer_errors_are_value_errors_as_from_tokenizer_says():
    assert issubclass(TokenizerError, ValueError)
    with pytest.raises(ValueError, match="no mask token"):
        ConnectiveMasker.from_tokenizer(_word_level(["<pad>"]), log=None)
    with pytest.raises(ValueError, match="expected a tokenizers.Tokenizer"):
        ConnectiveMasker.from_tokenizer("gpt2", log=None)


def test_tuples_are_taken_for_lists(tok):
    """Python callers write sequences as tuples: bert_split=(0.8, 0.1, 0.1) and rules as a tuple of tables."""
    m = ConnectiveMasker.from_tokenizer(tok, log=None, replacement="bert", bert_split=(0.7, 0.2, 0.1),
                                        strategy="structural", rules=({"p": 0.5},), **FEW)
    assert m.config.bert_split == [0.7, 0.2, 0.1] and [r.p for r in m.config.rules] == [0.5]


def test_the_masker_logs_through_logging_by_default_and_prints_nothing(tok, caplog, capsys):
    """A library user's logging configuration receives the masker's lines ("genesis.masking", INFO); nothing goes
    to stdout or stderr. log=print still prints them, log=None silences them."""
    import logging

    rows = torch.tensor([tok.encode("and it was so: for he said it, but they did not").ids])
    with caplog.at_level(logging.INFO, logger="genesis"):
        off = ConnectiveMasker.from_tokenizer(tok, enabled=False, **FEW)
        on = ConnectiveMasker.from_tokenizer(tok, strategy="uniform", mask_prob=1.0, impl="auto", **FEW)
        assert on(rows, step=0).mask.any() and not off(rows, step=0).mask.any()
    lines = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [("genesis.masking", "INFO", "masking: disabled (enabled = false): the masker returns its inputs "
                                                 "unchanged"),
                     ("genesis.masking", "INFO", "masking: using the torch path (cpu tensors use the torch path)")]
    assert capsys.readouterr() == ("", "")
    caplog.clear()
    ConnectiveMasker.from_tokenizer(tok, enabled=False, log=print, **FEW)
    ConnectiveMasker.from_tokenizer(tok, enabled=False, log=None, **FEW)
    assert capsys.readouterr().out == "masking: disabled (enabled = false): the masker returns its inputs unchanged\n"
    assert not caplog.records


def test_readout_is_off_by_default_and_refused_with_bert(masker, tok, rows):
    """masking.readout: off by default (out.readout is None, the stats have no readout counts); with
    replacement = "bert" a one-line error naming both keys, from from_tokenizer and from the config itself."""
    out = masker(rows, step=0)
    assert out.readout is None and out.readout_start is None
    assert not any(key.startswith("readout") for key in masker.stats(out, rows))
    for make in (lambda: ConnectiveMasker.from_tokenizer(tok, log=None, readout=True, replacement="bert", **FEW),
                 lambda: ConnectiveMasker.from_tokenizer(tok, {"readout": True, "replacement": "bert", **FEW},
                                                         log=None)):
        with pytest.raises(MaskingError, match=r"^masking\.readout: needs replacement = \"mask\"") as error:
            make()
        assert "\n" not in str(error.value) and "bert" in str(error.value)


def test_readout_from_the_public_call(tok, rows):
    """With readout = true the masker's call returns readout / readout_start (int64, the batch's shape and device)
    and changes no other output; the stats add up; a disabled masker returns them with no target."""
    settings = dict(strategy="uniform", mask_prob=1.0, **FEW)
    plain = ConnectiveMasker.from_tokenizer(tok, log=None, **settings)
    m = ConnectiveMasker.from_tokenizer(tok, log=None, readout=True, **settings)
    vs = torch.zeros_like(rows, dtype=torch.bool)
    out, expected = m(rows, step=2, verse_start=vs), plain(rows, step=2, verse_start=vs)
    for name in ("input_ids", "mask", "classes", "connectives", "matched"):
        assert torch.equal(getattr(out, name), getattr(expected, name)), name
    for t in (out.readout, out.readout_start):
        assert t.dtype == torch.int64 and t.shape == rows.shape and t.device == rows.device
    written = out.readout >= 0
    assert written.any() and torch.equal(written, out.readout_start >= 0)
    assert set(out.readout[written].tolist()) <= set(out.connectives[out.mask].tolist())
    stats = m.stats(out, rows)
    assert int(stats["readout_targets"]) == int(written.sum())
    assert int(stats["readout_targets"] + stats["readout_shared"] + stats["readout_dropped"]) == \
        int(stats["masked_words"])
    off = ConnectiveMasker.from_tokenizer(tok, log=None, readout=True, enabled=False, **settings)(rows, step=2)
    assert (off.readout == -100).all() and (off.readout_start == -1).all()
