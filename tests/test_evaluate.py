"""Tests for genesis/evaluate.py: every metric on models whose answers are known, on the real KJV, tokenizer and
lexicon, and `python -m genesis.evaluate` end to end on a checkpoint trained here."""

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from genesis import evaluate as ev
from genesis.config import load_config
from genesis.lexicon import CLASSES
from genesis.masking import clause_length

from .helpers import run_cli

SEQ_LEN = 128
CLOZE_ITEMS = 40
TINY = ["--set", "model.n_layers=2", "--set", "model.dim=64", "--set", "model.n_heads=2", "--set", "model.ffn_dim=128",
        "--set", "model.seq_len=64", "--set", "training.micro_batch=4", "--set", "training.steps=5",
        "--set", "training.eval_every=0", "--set", "training.log_every=5", "--set", "training.warmup_steps=2"]


@pytest.fixture(scope="module")
def ctx(kjv_tokenizer):
    """KJV held-out slots and 40 cloze items (with one verse of context) for the cpu.toml tokenizer."""
    return ev.build_context(load_config("cpu.toml"), kjv_tokenizer, SEQ_LEN, max_items=CLOZE_ITEMS, context_verses=1,
                            say=lambda *_: None)


# ----------------------------------------------------------------------------------------------------------------
# Models with known answers


class StubLM(torch.nn.Module):
    """The interface the evaluator uses: `model(idx) -> (logits (B, T, V), None)` and `model.args.seq_len`."""

    def __init__(self, vocab_size: int, seq_len: int = SEQ_LEN):
        super().__init__()
        self.vocab_size = vocab_size
        self.args = SimpleNamespace(seq_len=seq_len)
        self.calls = 0

    def forward(self, idx):
        self.calls += 1
        B, T = idx.shape
        return self.logits(idx, torch.zeros(B, T, self.vocab_size)), None

    def logits(self, idx, zeros):
        return zeros  # uniform


class FavouriteLM(StubLM):
    """Always puts the mass on the same few tokens, whatever the context."""

    def __init__(self, vocab_size: int, favourites: list[int]):
        super().__init__(vocab_size)
        self.favourites = favourites

    def logits(self, idx, zeros):
        zeros[:, :, self.favourites] = 30.0
        return zeros


class OracleLM(StubLM):
    """Puts (almost) all the mass on the token that really comes next. A row that is a stretch of the held-out
    stream gets the stream's next tokens; any other row is read against the reference sequences (prefix -> the next
    token); a context never seen gets uniform logits, so a wrong cloze candidate always scores below the answer."""

    def __init__(self, vocab_size: int, stream: np.ndarray, references: list[np.ndarray]):
        super().__init__(vocab_size)
        self.stream = stream.tolist()
        self.where: dict[tuple, list[int]] = {}
        for p in range(len(self.stream) - 8):
            self.where.setdefault(tuple(self.stream[p : p + 8]), []).append(p)
        self.next_of = {}
        for seq in references:
            seq = seq.tolist()
            for t in range(1, len(seq)):
                self.next_of[tuple(seq[:t])] = seq[t]

    def logits(self, idx, zeros):
        T = idx.shape[1]
        for b, row in enumerate(idx.tolist()):
            starts = [p for p in self.where.get(tuple(row[:8]), []) if self.stream[p : p + T] == row]
            if starts:
                following = self.stream[starts[0] + 1 : starts[0] + T + 1]  # one short at the end of the stream
                zeros[b, torch.arange(len(following)), torch.tensor(following)] = 30.0
                continue
            for t in range(T):
                following = self.next_of.get(tuple(row[: t + 1]))
                if following is not None:
                    zeros[b, t, following] = 30.0
        return zeros


def answer_sequences(cloze: ev.ClozeSet) -> list[np.ndarray]:
    K = cloze.n_candidates
    return [cloze.tokens[i * K + a] for i, a in enumerate(cloze.answer.tolist())]


def vocab(ctx) -> int:
    return ctx.tokenizer.get_vocab_size(with_added_tokens=True)


@pytest.fixture(scope="module")
def oracle_result(ctx):
    model = OracleLM(vocab(ctx), ctx.eval_split.stream, answer_sequences(ctx.cloze))
    return ev.evaluate_model(model, ctx, progress=False)


@pytest.fixture(scope="module")
def uniform_result(ctx):
    return ev.evaluate_model(StubLM(vocab(ctx)), ctx, progress=False)


# ----------------------------------------------------------------------------------------------------------------
# Items


def test_clause_buckets():
    assert [ev.clause_bucket(n) for n in (0, 1, 2, 5, 6, 11, 16, 29, 30)] == \
        ["0", "1", "2-5", "2-5", "6-10", "11-15", "16-29", "16-29", "30+"]


def test_slots_are_the_whole_word_connectives_of_the_heldout_verses(ctx):
    slots, lex = ctx.slots, ctx.lex
    assert len(slots) > 1000 and len(ctx.eval_split.verses) > 1500
    positions = [s.stream_pos for s in slots]
    assert positions == sorted(positions)
    for s in slots:
        verse = ctx.eval_split.verses[s.verse_index]
        assert verse.text[s.char_start : s.char_end].lower() == lex.words[s.entry]
        assert s.verse_initial == (s.char_start == 0)
        assert s.verse_initial == (s.stream_pos == ctx.eval_split.verse_first[s.verse_index])
        # the masker's clause length, on the stream: a verse-initial word measures the previous verse's last clause
        assert s.clause_len == clause_length(ctx.eval_split.stream, s.stream_pos, lex.clause_boundary,
                                             lex.verse_separator, 30)
        assert s.genre != "other"
    assert {"for", "but", "then"} <= {lex.words[s.entry] for s in slots}
    assert 100 < sum(s.verse_initial for s in slots) < len(slots) - 100
    assert sum(s.verse_initial and s.clause_len > 10 for s in slots) > 10  # the structural rules' first cell
    # "For" at a verse start and " for" inside a verse are both found, as different tokens
    first_ids = {(lex.words[s.entry], s.verse_initial): int(ctx.eval_split.stream[s.stream_pos]) for s in slots}
    assert first_ids[("for", True)] != first_ids[("for", False)]


def test_cloze_candidates_take_the_form_their_slot_needs(ctx):
    cloze, tok, lex = ctx.cloze, ctx.tokenizer, ctx.lex
    K = cloze.n_candidates
    assert len(cloze.items) == CLOZE_ITEMS and not cloze.skipped
    assert K == len(lex.words) - len(lex.unresolved)
    assert cloze.prefix_shared.all()  # byte-level BPE never re-tokenizes the words before the blank
    therefore = cloze.candidates.index(lex.words.index("therefore"))
    seen = set()
    for i, slot in enumerate(cloze.items):
        verse = ctx.eval_split.verses[slot.verse_index]
        answer = cloze.tokens[i * K + int(cloze.answer[i])]
        start = int(cloze.verse_start[i * K])
        assert tok.decode(answer[start:].tolist()) == verse.text + "\n"  # the answer is the verse itself
        j = i * K + therefore
        blank = tok.decode(cloze.tokens[j][cloze.blank_start[j] : cloze.blank_end[j]].tolist())
        original = verse.text[slot.char_start : slot.char_end]
        expected = ("Therefore" if original[0].isupper() else "therefore")
        assert blank.strip() == expected
        assert blank.startswith(" ") == (slot.char_start > 0 and verse.text[slot.char_start - 1] == " ")
        seen.add((slot.verse_initial, original[0].isupper()))
        # the suffix is the same text for every candidate
        suffixes = {tok.decode(cloze.tokens[i * K + k][cloze.blank_end[i * K + k] :].tolist()) for k in range(K)}
        assert suffixes == {verse.text[slot.char_end :] + "\n"}
    assert (True, True) in seen and (False, False) in seen


def test_cross_translation_uses_the_same_chapters_in_other_words():
    cfg = load_config("cpu.toml")
    kjv = ev.load_split_verses("kjv", cfg, "heldout")
    asv = ev.load_split_verses("asv", cfg, "heldout")
    chapters = {(v.book, v.chapter) for v in kjv}
    assert {(v.book, v.chapter) for v in asv} == chapters
    kjv_text = {(v.book, v.chapter, v.verse): v.text for v in kjv}
    differing = sum(kjv_text.get((v.book, v.chapter, v.verse)) != v.text for v in asv)
    assert differing > len(asv) // 2


# ----------------------------------------------------------------------------------------------------------------
# Metrics on known answers


def test_oracle_scores_100_percent_everywhere(ctx, oracle_result):
    nt, cz = oracle_result["next_token"], oracle_result["cloze"]["scorers"]
    assert nt["accuracy"] == 1.0 and nt["first_piece_accuracy"] == 1.0
    assert nt["skipped"] == 0 and nt["n"] == len(ctx.slots)
    assert nt["mean_logprob"] > -1e-6
    assert cz["model_verse"]["accuracy"] == 1.0
    assert cz["model_suffix"]["accuracy"] == 1.0
    for dim in ev.BREAKDOWNS:
        assert all(g["accuracy"] == 1.0 for g in cz["model_verse"]["breakdowns"][dim].values())


def test_uniform_model_gets_chance_and_ties_are_split_deterministically(ctx, uniform_result):
    V, cloze = vocab(ctx), ctx.cloze
    K, n = cloze.n_candidates, len(cloze.items)
    # next token: every one of the V logits ties, so each piece earns 1/V and a word of k pieces (1/V)^k
    expected = np.mean([(1 / V) ** s.n_pieces for s in ctx.slots])
    assert uniform_result["next_token"]["accuracy"] == pytest.approx(expected, rel=1e-9)
    credits = {name: [item["credit"][name] for item in uniform_result["items"]["cloze"]] for name in ev.CLOZE_SCORERS}
    # suffix-only: the suffix is the same tokens for every candidate, so all K tie: exactly chance
    assert credits["model_suffix"] == [round(1 / K, 6)] * n
    assert uniform_result["cloze"]["scorers"]["model_suffix"]["accuracy"] == pytest.approx(1 / K)
    # whole verse: -log V per token, so the candidates with the fewest pieces tie for first
    length = (cloze.lengths() - cloze.verse_start).reshape(n, K)
    shortest = length == length.min(axis=1, keepdims=True)
    expected = np.where(shortest[np.arange(n), cloze.answer], 1 / shortest.sum(axis=1), 0.0)
    assert credits["model_verse"] == pytest.approx(expected.tolist(), abs=1e-6)
    again = ev.evaluate_model(StubLM(V), ctx, progress=False)
    assert again["items"] == uniform_result["items"]


def test_a_model_that_always_says_for_scores_exactly_the_majority_baseline(ctx):
    tok, lex = ctx.tokenizer, ctx.lex
    majority = ctx.candidate_words[ev._majority(ctx.train_counts, ctx.cloze.candidates, None)]
    assert majority == "for"
    one_piece_fors = [lex.pattern_ids(p)[0] for p in range(lex.num_patterns)
                      if lex.words[lex.pattern_entry[p]] == "for" and lex.pattern_len[p] == 1]
    assert {tok.token_to_id(t) for t in ("For", "Ġfor", "ĠFor")} <= set(one_piece_fors)
    always_for = FavouriteLM(vocab(ctx), one_piece_fors)
    result = ev.evaluate_model(always_for, ctx, progress=False)
    items = result["items"]["cloze"]
    assert [i["credit"]["model_verse"] for i in items] == [i["credit"]["majority"] for i in items]
    assert {i["predicted"]["model_verse"] for i in items} == {"for"}
    scorers = result["cloze"]["scorers"]
    assert scorers["model_verse"]["accuracy"] == scorers["majority"]["accuracy"]
    assert 0 < scorers["majority"]["accuracy"] < 1
    # it ignores the context, so the suffix after every candidate scores the same: chance
    assert scorers["model_suffix"]["accuracy"] == pytest.approx(1 / ctx.cloze.n_candidates)
    # next token: right exactly where the connective is a one-piece "for", and tied with the other favourites
    for_slots = [s for s in ctx.slots if lex.words[s.entry] == "for"]
    favoured = [s.n_pieces == 1 for s in for_slots]
    assert sum(favoured) > 100
    assert result["next_token"]["breakdowns"]["word"]["for"]["accuracy"] == pytest.approx(
        np.mean(favoured) / len(one_piece_fors))
    assert result["next_token"]["breakdowns"]["word"]["but"]["accuracy"] == 0.0


def test_confusion_rows_sum_to_item_counts_and_breakdowns_add_up(ctx, uniform_result, oracle_result):
    K = ctx.cloze.n_candidates
    counts = np.bincount(ctx.cloze.answer, minlength=K)
    for result in (uniform_result, oracle_result):
        cz = result["cloze"]
        assert cz["confusion"]["labels"] == ctx.candidate_words
        for name in ev.CLOZE_SCORERS:
            matrix = np.array(cz["confusion"]["matrices"][name])
            assert matrix.shape == (K, K)
            assert np.allclose(matrix.sum(axis=1), counts, atol=1e-4)
            assert np.trace(matrix) / counts.sum() == pytest.approx(cz["scorers"][name]["accuracy"], abs=1e-4)
            summary = cz["scorers"][name]
            for groups in summary["breakdowns"].values():
                assert sum(g["n"] for g in groups.values()) == summary["n"] == len(ctx.cloze.items)
                weighted = sum(g["accuracy"] * g["n"] for g in groups.values()) / summary["n"]
                assert weighted == pytest.approx(summary["accuracy"])
        oracle = np.array(oracle_result["cloze"]["confusion"]["matrices"]["model_verse"])
        assert np.array_equal(oracle, np.diag(counts))
    assert set(uniform_result["next_token"]["breakdowns"]["class"]) <= set(CLASSES)


def first_items(cloze: ev.ClozeSet, n: int) -> ev.ClozeSet:
    seqs = slice(0, n * cloze.n_candidates)
    return dataclasses.replace(cloze, items=cloze.items[:n], answer=cloze.answer[:n], tokens=cloze.tokens[seqs],
                               verse_start=cloze.verse_start[seqs], blank_start=cloze.blank_start[seqs],
                               blank_end=cloze.blank_end[seqs], prefix_shared=cloze.prefix_shared[seqs])


def test_scoring_is_batched_not_per_item(ctx):
    cloze = first_items(ctx.cloze, 8)
    model = StubLM(vocab(ctx))
    full = ev.score_cloze_model(model, cloze, batch_tokens=4096, progress=False)
    assert model.calls <= math.ceil(len(cloze.tokens) / (4096 // cloze.lengths().max()))  # 208 sequences
    model.calls = 0
    ev.score_next_token(model, ctx.eval_split.stream, ctx.slots[:300], progress=False)
    assert model.calls <= math.ceil(300 / (ev.DEFAULT_BATCH_TOKENS // SEQ_LEN))
    # a smaller budget changes the batches, not the scores
    small = ev.score_cloze_model(StubLM(vocab(ctx)), cloze, batch_tokens=300, progress=False)
    assert np.array_equal(small.verse, full.verse) and np.array_equal(small.suffix, full.suffix)


def test_kneser_ney_trigram_is_a_probability_distribution():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 40, size=5000)
    tokens[::7] = 3  # some structure: 3 is frequent
    lm = ev.KneserNeyTrigram(tokens, vocab_size=50)
    everything = np.arange(50)
    for a, b in [(tokens[10], tokens[11]), (-1, tokens[11]), (45, 46), (-1, 49), (3, 3)]:
        p = np.exp(lm.logprob(np.full(50, a), np.full(50, b), everything))
        assert p.sum() == pytest.approx(1.0, abs=1e-9)
        assert (p > 0).all()  # ids never seen (40-49) still get mass from the uniform floor
    # a seen continuation beats an unseen one
    a, b, c = tokens[100:103]
    assert lm.logprob([a], [b], [c])[0] > lm.logprob([a], [b], [45])[0]


def test_ngram_baseline_reads_the_kjv_far_above_chance(ctx, uniform_result):
    scorers = uniform_result["cloze"]["scorers"]
    chance = 1 / ctx.cloze.n_candidates
    assert scorers["kn3_verse"]["accuracy"] > 5 * chance
    assert scorers["positional_majority"]["accuracy"] >= scorers["majority"]["accuracy"] - 0.05


# ----------------------------------------------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    run_cli("genesis.train", "--config", "cpu.toml", "--out", str(out), *TINY)
    return out


def test_evaluate_cli_writes_tables_json_and_plots(tiny_run, tmp_path):
    out = tmp_path / "eval"
    proc = run_cli("genesis.evaluate", "--checkpoint", str(tiny_run / "checkpoint.pt"), "--max-items", "12",
                   "--out", str(out), "--json", str(tmp_path / "result.json"), "--batch-tokens", "2048")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["step"] == 5 and result["corpus"] == "kjv" and result["seq_len"] == 64
    # a 64-token model cannot hold the longest verses: those items are skipped, and counted
    assert result["cloze"]["n_items"] + sum(result["cloze"]["skipped"].values()) == 12
    assert set(result["cloze"]["skipped"]) <= {"verse_longer_than_model"} and result["cloze"]["n_items"] >= 9
    assert set(result["cloze"]["scorers"]) == set(ev.CLOZE_SCORERS)
    assert result["next_token"]["n"] > 1000 and 0 <= result["next_token"]["accuracy"] <= 1
    assert len(result["items"]["cloze"]) == result["cloze"]["n_items"]
    for name in ("hardest_connectives", "accuracy_by_clause_length", "confusion", "accuracy_by_genre"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "cloze, whole-verse score" in proc.stdout and "clause length" in proc.stdout
    assert "cloze/model:" in proc.stderr  # progress on long work


def test_evaluate_cli_errors_are_one_line_with_exit_2(tiny_run, tmp_path):
    missing = run_cli("genesis.evaluate", "--checkpoint", str(tmp_path / "nope.pt"), check=False)
    bad_corpus = tmp_path / "bad.txt"
    bad_corpus.write_bytes(b"Genesis 1:1 In the beginning\n\xff\xfe broken\n")
    unreadable = run_cli("genesis.evaluate", "--checkpoint", str(tiny_run), "--corpus", str(bad_corpus),
                         "--no-plots", check=False)
    for proc, needle in ((missing, "checkpoint not found"), (unreadable, "not valid UTF-8")):
        assert proc.returncode == 2
        assert proc.stderr.startswith("error: ") and needle in proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_output_head_path_equals_the_full_forward_on_a_llama(ctx):
    """The fast path (hidden states, then the head at the scored positions only) against `model(x)` + gather."""
    from genesis.model import Llama, ModelArgs

    torch.manual_seed(0)
    llama = Llama(ModelArgs(vocab_size=vocab(ctx), n_layers=2, dim=64, n_heads=2, n_kv_heads=2, ffn_dim=128,
                            seq_len=SEQ_LEN)).eval()
    cloze = first_items(ctx.cloze, 6)
    head = ev.score_cloze_model(llama, cloze, progress=False, path="head")
    full = ev.score_cloze_model(llama, cloze, progress=False, path="full")
    assert np.allclose(head.verse, full.verse, atol=1e-3) and np.allclose(head.suffix, full.suffix, atol=1e-3)
    slots = ctx.slots[:150]
    head = ev.score_next_token(llama, ctx.eval_split.stream, slots, progress=False, path="head")
    full = ev.score_next_token(llama, ctx.eval_split.stream, slots, progress=False, path="full")
    assert np.allclose(head.logprob, full.logprob, atol=1e-4)
    with pytest.raises(ValueError, match="path must be one of"):
        ev.score_cloze_model(llama, cloze, progress=False, path="fast")
