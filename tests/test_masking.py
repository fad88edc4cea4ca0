"""The connective masker: Triton kernel == torch path (exactly), both == the lexicon oracle, the rules, the rates,
the random keys, bad input and dispatch.

Kernel tests run the real Triton kernel: under TRITON_INTERPRET=1 on the CPU (set by conftest.py on machines
without CUDA), compiled on a GPU where there is one (the `cuda` tests at the end)."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from genesis.lexicon import DEFAULT_CONNECTIVES, find_matches
from genesis.masking import (
    ConnectiveMasker,
    MaskingError,
    choose_impl,
    clause_length,
    mask_torch,
    philox4x32,
    uniform_from_bits,
)

from .helpers import ROOT

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernel = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                  reason="needs TRITON_INTERPRET=1 or a CUDA GPU")
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


def kernel(masker, x, step, verse_start=None, row_offset=0, block=64):
    """The Triton kernel on KERNEL_DEVICE (inputs already there keep their strides); outputs on x's device."""
    from genesis.kernels.mask import connective_mask_triton

    home = x.device
    x = x.to(KERNEL_DEVICE)
    verse_start = None if verse_start is None else verse_start.to(KERNEL_DEVICE)
    tables = masker.tables(x.device)
    out = connective_mask_triton(x, verse_start, tables, masker.seed, step, masker.rank, row_offset, block=block)
    return tuple(t.to(home) for t in out)


def torch_path(masker, x, step, verse_start=None, row_offset=0):
    return mask_torch(x, verse_start, masker.tables(x.device), masker.seed, step, masker.rank, row_offset)


def assert_same(a, b):
    names = ("input_ids", "mask", "classes", "connectives")
    for name, u, v in zip(names, a, b):
        assert u.dtype == v.dtype and u.shape == v.shape, name
        assert torch.equal(u, v), f"{name} differs at {torch.nonzero(u != v)[:5].tolist()}"


@pytest.fixture(scope="module")
def tok(kjv_tokenizer):
    return kjv_tokenizer


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
    from genesis.masking import _philox_numpy, _philox_torch

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


@needs_kernel
@pytest.mark.parametrize("replacement", list(REPLACEMENTS))
@pytest.mark.parametrize("strategy", ["uniform", "structural"])
def test_kernel_equals_torch_on_adversarial_batches(tok, strategy, replacement):
    mode = "since_boundary" if replacement == "bert" else "preceding"
    masker = make_masker(tok, **STRATEGIES[strategy], **REPLACEMENTS[replacement], lookback=12, clause_length=mode)
    x = adversarial_batch(masker, (2, 193), seed=len(strategy) + len(replacement))
    vs = torch.from_numpy(np.random.default_rng(1).random((2, 193)) < 0.1)
    for verse_start in (vs, None):
        expected = torch_path(masker, x, 3, verse_start, row_offset=5)
        assert expected[1].sum() > 10
        assert_same(kernel(masker, x, 3, verse_start, row_offset=5, block=64), expected)


def test_longer_words_host_loop_equals_vectorized(tok):
    """The CPU checks the rare longer words in a Python loop; CUDA uses the vectorized version: both agree."""
    masker = make_masker(tok, strategy="uniform", mask_prob=1.0)
    for seed in range(3):
        x = adversarial_batch(masker, (4, 257), seed=seed)
        host = torch_path(masker, x, 0)
        vectorized = mask_torch(x, None, masker.tables("cpu"), masker.seed, 0, host_words=False)
        assert_same(host, vectorized)
        assert (host[1].sum(1) > 0).all()


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (1, 7), (3, 65), (0, 5), (4, 0)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_kernel_equals_torch_on_odd_shapes_and_dtypes(tok, shape, dtype):
    masker = make_masker(tok, strategy="uniform", mask_prob=1.0, replacement="bert", bert_split=[0.5, 0.3, 0.2])
    x = adversarial_batch(masker, shape, seed=sum(shape)).to(dtype)
    got, expected = kernel(masker, x, 1, block=32), torch_path(masker, x, 1)
    assert_same(got, expected)
    assert got[0].dtype == dtype


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
def test_kernel_result_does_not_depend_on_block_size(tok, kjv_rows):
    masker = make_masker(tok, strategy="structural")
    x, vs = kjv_rows[0][:1, :500].contiguous(), kjv_rows[1][:1, :500].contiguous()
    assert_same(kernel(masker, x, 2, vs, block=32), kernel(masker, x, 2, vs, block=256))


COMPILE_CHECK = """
import sys, torch
from tokenizers import Tokenizer
from genesis.kernels.mask import compile_for
from genesis.masking import ConnectiveMasker
tok = Tokenizer.from_file(sys.argv[1])
if sys.argv[2] == "everything":
    masker = ConnectiveMasker.from_tokenizer(tok, strategy="structural", structural_weights=True, replacement="bert",
                                             log=None)
    x, vs = torch.zeros(2, 100, dtype=torch.int64), torch.zeros(2, 100, dtype=torch.bool)
else:
    masker = ConnectiveMasker.from_tokenizer(tok, strategy="uniform", clause_length="since_boundary", log=None)
    x, vs = torch.zeros(2, 100, dtype=torch.int32), None
kernel = compile_for(89, x, vs, masker.tables("cpu"))
print("compiled", len(kernel.asm["cubin"]), "bytes of sm_89 code")
"""


@pytest.mark.parametrize("variant", ["everything", "nothing"])
def test_kernel_compiles_for_a_gpu_without_one(tok, tmp_path, variant):
    """The interpreter runs Python the compiler rejects (it read a plain module-level constant that compiled
    kernels cannot, and only the first GPU run found out). Triton's compiler and ptxas need no GPU: compile the
    kernel for an RTX 40xx (sm_89) with every branch on, and with every branch off, as the launcher would."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton >= 3.9 warns when unset; 1 is what launches use
    proc = subprocess.run([sys.executable, "-c", COMPILE_CHECK, str(path), variant], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


@needs_kernel
def test_kernel_never_reads_out_of_bounds_on_invalid_ids(tok):
    """Ids outside the vocabulary are never connectives and pass through unchanged, in both paths."""
    masker = make_masker(tok, strategy="uniform", mask_prob=1.0, check_ids=False)
    x = adversarial_batch(masker, (2, 80))
    x[0, ::7] = -3
    x[1, ::5] = 10**6
    expected = torch_path(masker, x, 0)
    assert_same(kernel(masker, x, 0, block=32), expected)
    assert (expected[0][x < 0] == x[x < 0]).all() and not expected[1][x < 0].any()


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
    assert torch.equal(out.connectives, expected_entry)
    assert (out.input_ids[out.mask] == masker.mask_id).all() and torch.equal(out.input_ids[~out.mask], x[~out.mask])
    classes = torch.tensor(masker.lexicon.entry_class, dtype=torch.int64)
    assert torch.equal(out.classes[out.mask], classes[out.connectives[out.mask]])
    assert (out.classes[~out.mask] == -100).all()
    assert masker.stats(out, x)["masked_words"].item() == n_words
    assert n_words > 0.018 * x.numel()  # ~2% of KJV tokens are connectives


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
    from genesis.masking import compile_prob_table

    table, weighted = compile_prob_table(MaskingConfig(strategy="structural", lookback=30))
    cells = table.view(2, 31)
    assert not weighted
    assert cells[1, 11:].eq(0.8).all() and cells[1, 1:11].eq(0.6).all()
    assert cells[0, 16:].eq(0.5).all() and cells[0, 1:16].eq(0.3).all()
    table, weighted = compile_prob_table(MaskingConfig(strategy="weighted", base_probability=0.4))
    assert weighted and table.eq(0.4).all()


# ----------------------------------------------------------------------------------------------------------------
# Rates on the KJV (binomial tests)

Z_LIMIT = 4.42  # two-sided p < 1e-5 per test; < 1e-3 family-wise over the ~60 tests below (Bonferroni)


def z_score(k, n, p):
    return (k - n * p) / math.sqrt(max(n * p * (1 - p), 1e-12))


def masked_rates(masker, x, vs, steps, group_of):
    """{group: (masked words, words)} over several steps, from each match's first piece."""
    counts: dict = {}
    matches = [reference_cells(row, flags, masker.lexicon, masker.config.lookback, masker.config.clause_length)
               for row, flags in zip(x.tolist(), vs.tolist())]
    for step in range(steps):
        mask = masker(x, step=step, verse_start=vs).mask
        for b, row_matches in enumerate(matches):
            for start, _, entry, vi, cl in row_matches:
                key = group_of(entry, vi, cl)
                k, n = counts.get(key, (0, 0))
                counts[key] = (k + int(mask[b, start]), n + 1)
    return counts


def test_weighted_rates_per_connective(tok, kjv_rows):
    base = 0.5
    masker = make_masker(tok, strategy="weighted", base_probability=base)
    x, vs = kjv_rows
    counts = masked_rates(masker, x, vs, steps=3, group_of=lambda e, vi, cl: masker.lexicon.words[e])
    tested = 0
    for word, (k, n) in counts.items():
        if n < 300:
            continue
        p = base * DEFAULT_CONNECTIVES[word][0]
        assert abs(z_score(k, n, p)) < Z_LIMIT, (word, k, n, p)
        if n > 5000:  # power: a rate off by 0.05 would be caught
            assert abs(z_score(k, n, p + 0.05)) > Z_LIMIT, word
        tested += 1
    assert tested >= 8


def test_structural_rates_per_cell(tok, kjv_rows):
    masker = make_masker(tok, strategy="structural")

    def cell(entry, vi, cl):
        if vi:
            return ("verse-initial", cl > 10)
        return ("inside", cl > 15)

    counts = masked_rates(masker, x := kjv_rows[0], kjv_rows[1], steps=3, group_of=cell)
    expected = {("verse-initial", True): 0.8, ("verse-initial", False): 0.6, ("inside", True): 0.5,
                ("inside", False): 0.3}
    for key, p in expected.items():
        k, n = counts[key]
        assert n >= 30, key
        assert abs(z_score(k, n, p)) < Z_LIMIT, (key, k, n, p)
    assert x.numel() > 0


def test_bert_split_fractions(tok, kjv_rows):
    masker = make_masker(tok, strategy="uniform", mask_prob=1.0, replacement="bert", bert_split=[0.8, 0.1, 0.1])
    x, vs = kjv_rows[0][:300], kjv_rows[1][:300]
    out = masker(x, step=0, verse_start=vs)
    picked_ids, original = out.input_ids[out.mask], x[out.mask]
    n = len(picked_ids)
    masked = (picked_ids == masker.mask_id).sum().item()
    kept = (picked_ids == original).sum().item()
    assert abs(z_score(masked, n, 0.8)) < Z_LIMIT and abs(z_score(kept, n, 0.1 + 0.1 / 8000)) < Z_LIMIT
    from genesis.tokenizer import special_ids

    randoms = picked_ids[(picked_ids != masker.mask_id) & (picked_ids != original)]
    assert len(randoms) > 0.08 * n and not set(randoms.tolist()) & special_ids(tok)
    # a word's pieces share one decision: every piece of a multi-token word is masked, random or kept together
    words = masker.lexicon.words
    assert len(words) > 0


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
    cpu = torch_path(masker, x, 9, vs)
    xc, vc = x.cuda(), vs.cuda()
    for got in (kernel(masker, xc, 9, vc, block=256), torch_path(masker, xc, 9, vc)):
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
