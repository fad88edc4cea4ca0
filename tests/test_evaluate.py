"""Tests for genesis/evaluate/: every metric on models whose answers are known, on the real KJV, tokenizer and
lexicon, and `python -m genesis.evaluate` end to end on a checkpoint trained here."""

import dataclasses
import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from genesis import evaluate as ev
from genesis.config import load_config
from genesis.corpus import load_corpus
from genesis.evaluate.pipeline import _majority
from genesis.evaluate.scorers import PREFIX_PATH_TOLERANCE
from genesis.lexicon import CLASSES
from genesis.masking import clause_length, readout_position
from genesis.tokenizer import find_mask_id

from .helpers import run_cli

SEQ_LEN = 128
CLOZE_ITEMS = 40
TINY = ["--set", "model.n_layers=2", "--set", "model.dim=64", "--set", "model.n_heads=2", "--set", "model.ffn_dim=128",
        "--set", "model.seq_len=64", "--set", "training.micro_batch=4", "--set", "training.steps=5",
        "--set", "training.eval_every=0", "--set", "training.log_every=5", "--set", "training.warmup_steps=2"]


@pytest.fixture(scope="module")
def ctx(kjv_tokenizer):
    """KJV held-out slots and 40 cloze items (with one verse of context) for the cpu.toml tokenizer; the frozen
    probe's training occurrences capped at 2,000 (the default 8,000 makes every whole evaluation here ~4x slower)."""
    return ev.build_context(load_config("cpu.toml"), kjv_tokenizer, SEQ_LEN, max_items=CLOZE_ITEMS, context_verses=1,
                            say=lambda *_: None, probe_max_train=2000)


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


def test_wilson_intervals_stay_in_0_1_and_are_not_empty_at_the_ends():
    from genesis.evaluate.report import wilson

    assert wilson(0.5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)  # 0 of 10: up to 28%, not [0, 0]
    assert wilson(1.0, 20) == pytest.approx((0.8389, 1.0), abs=1e-4)
    assert wilson(0.3, 0) == (0.0, 1.0)


def test_hardest_connectives_plot_keeps_words_with_enough_items(tmp_path):
    """Words under the floor are left out (the title says how many are shown); the rest go hardest first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from genesis.evaluate.report import hardest_words, plot_hardest_connectives

    words = {"for": (0.6, 400), "but": (0.2, 120), "lest": (0.0, 3), "because": (0.2, 40), "thus": (0.05, 25)}
    breakdown = {w: {"accuracy": a, "n": n} for w, (a, n) in words.items()}
    next_token = {w: {"accuracy": a / 20, "n": 3 * n} for w, (a, n) in words.items()}
    result = {"corpus": "kjv", "split": "heldout", "step": 400, "next_token": {"breakdowns": {"word": next_token}},
              "cloze": {"scorers": {"model_verse": {"breakdowns": {"word": breakdown}},
                                    "kn3_verse": {"accuracy": 0.3, "breakdowns": {"word": breakdown}},
                                    "majority": {"accuracy": 0.35}}}}
    assert hardest_words(result) == ["thus", "but", "because", "for"]
    assert hardest_words(result, min_items=100) == ["but", "for"]
    path = plot_hardest_connectives(plt, result, tmp_path / "hardest.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_the_next_token_axis_has_at_most_five_round_ticks_in_whole_percents_where_the_step_allows():
    from genesis.evaluate.report import percent_ticks

    ticks, labels = percent_ticks(0.27)
    assert labels == ["0%", "10%", "20%"] and ticks == pytest.approx([0.0, 0.1, 0.2])
    assert percent_ticks(0.0945)[1] == ["0%", "2%", "4%", "6%", "8%"]
    assert percent_ticks(0.004)[1] == ["0.0%", "0.1%", "0.2%", "0.3%", "0.4%"]
    assert all(len(percent_ticks(top)[0]) <= 5 for top in np.linspace(0.001, 1.0, 200))


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


def test_slots_carry_the_sense_rules_verdict_and_the_labelled_sample_is_made_of_them(ctx):
    """Every slot's `conjunctive` is the rule's verdict on its verse; every item of the hand-labelled sample is a
    held-out slot of the cpu.toml split, with the verse text of the corpus."""
    lex = ctx.lex
    for s in ctx.slots:
        text = ctx.eval_split.verses[s.verse_index].text
        assert s.conjunctive == ev.is_conjunctive(lex.words[s.entry], text, s.char_start, s.char_end)
    n_conjunctive = sum(s.conjunctive for s in ctx.slots)
    assert 300 < n_conjunctive < len(ctx.slots) - 300  # both sets are large: a rule stuck on one answer fails here
    by_id = {s.item_id: s for s in ctx.slots}
    rows = (Path(__file__).parent / "data" / "connective_senses.tsv").read_text(encoding="utf-8").splitlines()[1:]
    for row in rows:
        item_id, word, marked = row.split("\t")[:3]
        slot = by_id[item_id]
        assert lex.words[slot.entry] == word
        assert ctx.eval_split.verses[slot.verse_index].text == marked.replace("[[", "").replace("]]", "")


def parse_item_id(item_id: str) -> tuple[str, int, int, int]:
    """"II Samuel 7:12@25" -> ("II Samuel", 7, 12, 25)."""
    reference, at = item_id.rsplit("@", 1)
    book, chapter_verse = reference.rsplit(" ", 1)
    chapter, verse = chapter_verse.split(":")
    return book, int(chapter), int(verse), int(at)


# Written out here, not read from genesis.corpus.GENRES: books of the KJV held-out chapters and their genres.
KNOWN_GENRES = {"Genesis": "law", "Exodus": "law", "Deuteronomy": "law", "Ruth": "history", "II Samuel": "history",
                "Nehemiah": "history", "Job": "wisdom", "Psalms": "wisdom", "Isaiah": "prophets",
                "Jeremiah": "prophets", "Daniel": "prophets", "John": "gospels", "Acts": "acts",
                "II Corinthians": "epistles", "Hebrews": "epistles", "II Timothy": "epistles"}


def test_items_carry_the_book_and_genre_of_their_verse(ctx, kjv, uniform_result):
    lex = ctx.lex
    kjv_text = {(v.book, v.chapter, v.verse): v.text for v in kjv}
    for s in ctx.slots:
        book, chapter, verse, at = parse_item_id(s.item_id)
        assert s.book == book == ctx.eval_split.verses[s.verse_index].book
        word = lex.words[s.entry]
        # the id points into the KJV itself: the word is at that offset of that verse
        assert kjv_text[(book, chapter, verse)][at : at + len(word)].lower() == word
    by_book = Counter(s.book for s in ctx.slots)
    for book, genre in KNOWN_GENRES.items():
        assert by_book[book] > 0, book  # the held-out split has chapters of it
        assert {s.genre for s in ctx.slots if s.book == book} == {genre}, book
    # the breakdowns count the same labels
    breakdowns = uniform_result["next_token"]["breakdowns"]
    assert {book: group["n"] for book, group in breakdowns["book"].items()} == dict(by_book)
    assert breakdowns["genre"]["wisdom"]["n"] == by_book["Job"] + by_book["Psalms"]  # no other wisdom book held out
    assert breakdowns["genre"]["acts"]["n"] == by_book["Acts"]
    assert [item["book"] for item in uniform_result["items"]["cloze"]] == [s.book for s in ctx.cloze.items]


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


def test_cross_translation_evaluates_a_kjv_run_on_the_asv_wording(ctx, tiny_run, tmp_path, capsys):
    """`--corpus asv` end to end on a real (5-step) run: the items are the ASV's connectives, not the KJV's."""
    out = tmp_path / "asv.json"
    assert ev.main(["--checkpoint", str(tiny_run), "--corpus", "asv", "--max-items", "8", "--json", str(out),
                    "--out", str(tmp_path), "--no-plots", "--quiet", "--device", "cpu"]) == 0
    capsys.readouterr()
    result = json.loads(out.read_text())
    assert (result["corpus"], result["train_corpus"]) == ("asv", "kjv")
    assert result["link"]["probe"]["max_train"] == ev.PROBE_MAX_TRAIN == 8000  # the documented default
    chapters = {(v.book, v.chapter) for v in ctx.eval_split.verses}
    asv_text = {(v.book, v.chapter, v.verse): v.text for v in load_corpus("asv") if (v.book, v.chapter) in chapters}
    kjv_text = {(v.book, v.chapter, v.verse): v.text for v in ctx.eval_split.verses}
    whole_word = re.compile(r"\b(?:" + "|".join(ctx.lex.words) + r")\b", re.IGNORECASE)
    asv_count = sum(len(whole_word.findall(text)) for text in asv_text.values())
    kjv_count = sum(len(whole_word.findall(text)) for text in kjv_text.values())
    assert kjv_count == len(ctx.slots) == 1133  # the README's count
    nt = result["next_token"]
    assert nt["n"] + nt["skipped"] == asv_count == 1098
    items = result["items"]["next_token"] + result["items"]["cloze"]
    assert len(result["items"]["cloze"]) == result["cloze"]["n_items"] > 0
    elsewhere_in_kjv = 0
    for item in items:
        book, chapter, verse, at = parse_item_id(item["id"])
        word = item["word"]
        assert asv_text[(book, chapter, verse)][at : at + len(word)].lower() == word
        elsewhere_in_kjv += kjv_text[(book, chapter, verse)][at : at + len(word)].lower() != word
    assert elsewhere_in_kjv > 100  # the ASV moves the words: these offsets hold something else in the KJV


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
    nt = uniform_result["next_token"]
    expected = np.mean([(1 / V) ** s.n_pieces for s in ctx.slots])
    assert nt["accuracy"] == pytest.approx(expected, rel=1e-9)
    # the first piece alone: 1/V for every word; log p of a word of k pieces: exactly -k log V
    assert nt["first_piece_accuracy"] == pytest.approx(1 / V, rel=1e-12)
    pieces = np.array([s.n_pieces for s in ctx.slots])
    assert nt["skipped"] == 0 and (pieces > 1).any()  # so a log p of the first piece only would differ
    assert nt["mean_logprob"] == pytest.approx(-pieces.mean() * math.log(V), rel=1e-6)
    logprob = {item["id"]: item["logprob"] for item in uniform_result["items"]["next_token"]}
    assert [logprob[s.item_id] for s in ctx.slots] == pytest.approx(-pieces * math.log(V), abs=1e-4)
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
    majority = ctx.candidate_words[_majority(ctx.train_counts, ctx.cloze.candidates, None)]
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


def test_every_metric_is_given_on_the_conjunctive_set_of_its_items(ctx, oracle_result):
    """`sets.all` repeats the top level; `sets.conjunctive` is the mean over the items whose record says
    conjunctive (the oracle is wrong nowhere, so a stub whose credit depends on the item is used: majority)."""
    result = ev.evaluate_model(StubLM(vocab(ctx)), ctx, progress=False)
    cloze_items, next_items = result["items"]["cloze"], result["items"]["next_token"]
    assert all(isinstance(item["conjunctive"], bool) for item in cloze_items + next_items)
    assert [item["conjunctive"] for item in cloze_items] == [s.conjunctive for s in ctx.cloze.items]
    assert 0 < sum(item["conjunctive"] for item in cloze_items) < len(cloze_items)
    for name in ev.CLOZE_SCORERS:
        summary = result["cloze"]["scorers"][name]
        assert summary["sets"]["all"] == {"accuracy": summary["accuracy"], "n": summary["n"]}
        mine = [item["credit"][name] for item in cloze_items if item["conjunctive"]]
        assert summary["sets"]["conjunctive"]["n"] == len(mine)
        assert summary["sets"]["conjunctive"]["accuracy"] == pytest.approx(np.mean(mine), abs=1e-6)
    majority = result["cloze"]["scorers"]["majority"]["sets"]  # "for" is right on 0 or 1 item: the sets differ
    assert majority["conjunctive"]["accuracy"] != pytest.approx(majority["all"]["accuracy"])
    nt = result["next_token"]
    mine = [item for item in next_items if item["conjunctive"]]
    assert nt["sets"]["conjunctive"]["n"] == len(mine) == sum(s.conjunctive for s in ctx.slots if s.stream_pos > 0)
    assert nt["sets"]["conjunctive"]["mean_logprob"] == pytest.approx(np.mean([i["logprob"] for i in mine]),
                                                                      abs=1e-4)
    assert nt["sets"]["all"]["mean_logprob"] == nt["mean_logprob"]
    mc = result["masked_context"]  # every held-out slot is followed by tokens
    assert mc["sets"]["conjunctive"]["n"] == sum(s.conjunctive for s in ctx.slots) < mc["n"]
    assert oracle_result["cloze"]["scorers"]["model_verse"]["sets"]["conjunctive"]["accuracy"] == 1.0
    text = ev.format_tables({**result, "checkpoint": "x", "step": 0, "corpus": "kjv", "split": "heldout",
                             "train_corpus": "kjv"})
    rows = [line for line in text.splitlines() if line.startswith("cloze, whole-verse score")]
    assert [row.split()[3] for row in rows] == ["all", "conjunctive"]
    assert "masked context (conjunctive only): loss" in text


def test_tables_of_an_eval_json_from_before_the_sets_still_print(uniform_result):
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "sets"}
        return value

    old = strip({**uniform_result, "checkpoint": "x", "step": 0, "corpus": "kjv", "split": "heldout",
                 "train_corpus": "kjv"})
    text = ev.format_tables(old)
    assert "conjunctive " not in text and "masked context: loss" in text


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


def kn_reference(tokens: list[int], vocab_size: int):
    """Interpolated Kneser-Ney (Chen & Goodman 1998, one discount per order) from Python dicts, position by position:
    the brute-force twin of `KneserNeyTrigram`. Returns p(a, b, c); a = -1 for a single token of context."""
    trigrams = Counter(zip(tokens, tokens[1:], tokens[2:]))
    continuations = Counter((b, c) for a, b, c in trigrams)  # N1+(. b c)
    unigram_continuations = Counter(c for b, c in continuations)  # N1+(. c)

    def discount(counts) -> float:
        counts = list(counts)
        n1, n2 = counts.count(1), counts.count(2)
        return n1 / (n1 + 2 * n2) if n1 else 0.75

    d1, d2, d3 = (discount(c.values()) for c in (unigram_continuations, continuations, trigrams))
    bigram_types = sum(unigram_continuations.values())

    def p(a: int, b: int, c: int) -> float:
        p1 = (max(unigram_continuations[c] - d1, 0) + d1 * len(unigram_continuations) / vocab_size) / bigram_types
        after_b = {z: n for (y, z), n in continuations.items() if y == b}
        p2 = p1 if not after_b else (max(after_b.get(c, 0) - d2, 0) + d2 * len(after_b) * p1) / sum(after_b.values())
        after_ab = {z: n for (x, y, z), n in trigrams.items() if (x, y) == (a, b)}
        if a < 0 or not after_ab:
            return p2
        return (max(after_ab.get(c, 0) - d3, 0) + d3 * len(after_ab) * p2) / sum(after_ab.values())

    return p


TINY_CORPUS = [0, 1, 2, 0, 1, 2, 0, 1, 3, 2, 1, 3]  # V = 5: token 4 never occurs


def test_kneser_ney_trigram_equals_hand_computed_probabilities():
    """On TINY_CORPUS (V = 5), by hand:
    trigrams 012 x2, 120 x2, 201 x2, 013, 132, 321, 213: n1 = 4, n2 = 3, D3 = 4 / (4 + 6) = 0.4.
    N1+(. b c): 12:1 20:1 01:1 13:2 32:1 21:1: n1 = 5, n2 = 1, D2 = 5/7. N1+(. c): 0:1 1:2 2:2 3:1, so
    n1 = n2 = 2, D1 = 1/3; N1+(..) = 6 bigram types, 4 seen tokens.
    p1(2) = (2 - 1/3 + 1/3 * 4/5) / 6 = 29/90;   p1(4) = (1/3 * 4/5) / 6 = 2/45.
    p2(2|1) = (1 - 5/7 + 5/7 * 2 * 29/90) / 3 = 47/189   (after 1: 12:1, 13:2, so 3 in all, 2 types);
    p2(4|1) = (5/7 * 2 * 2/45) / 3 = 4/189.
    p3(2|0,1) = (2 - 0.4 + 0.4 * 2 * 47/189) / 3 = 340/567   (after 01: 012 x2, 013: 3 in all, 2 types);
    p3(4|0,1) = (0.4 * 2 * 4/189) / 3 = 16/2835."""
    lm = ev.KneserNeyTrigram(np.array(TINY_CORPUS), vocab_size=5)
    assert (lm.d1, lm.d2, lm.d3) == pytest.approx((1 / 3, 5 / 7, 0.4), rel=1e-15)

    def p(a, b, c):
        return float(np.exp(lm.logprob([a], [b], [c])[0]))

    assert p(0, 1, 2) == pytest.approx(340 / 567, rel=1e-12)
    assert p(0, 1, 4) == pytest.approx(16 / 2835, rel=1e-12)
    assert p(-1, 1, 2) == pytest.approx(47 / 189, rel=1e-12)  # one token of context: the bigram level
    assert p(4, 1, 2) == pytest.approx(47 / 189, rel=1e-12)  # context (4, 1) never seen: the bigram level too
    assert p(3, 4, 2) == pytest.approx(29 / 90, rel=1e-12)  # 4 never seen: the unigram level
    assert p(-1, 4, 4) == pytest.approx(2 / 45, rel=1e-12)
    # and every (a, b, c) against the brute-force reference, on this corpus and on a random one
    for tokens, V in ((TINY_CORPUS, 5), (np.random.default_rng(4).integers(0, 7, size=300).tolist(), 9)):
        reference = kn_reference(tokens, V)
        lm = ev.KneserNeyTrigram(np.array(tokens), vocab_size=V)
        a, b, c = (x.ravel() for x in np.meshgrid(np.arange(-1, V), np.arange(V), np.arange(V), indexing="ij"))
        expected = [reference(*abc) for abc in zip(a.tolist(), b.tolist(), c.tolist())]
        assert np.exp(lm.logprob(a, b, c)) == pytest.approx(expected, rel=1e-12)


def test_ngram_cloze_scores_the_verse_and_the_suffix_of_each_candidate():
    """Two items, two one-token candidates each, scored by the TINY_CORPUS trigram. Sequence = [context 2 or 0]
    + verse; the verse is [0 or 1] + [candidate] + suffix. From `kn_reference` (nats):
      item 0: 2 | 0 _ 2 1, candidates 1, 3: verse -4.579, -6.128 (1 wins); suffix -3.107, -0.951 (3 wins)
      item 1: 0 | 1 _ 2 0, candidates 1, 3: verse -5.411, -4.260 (3 wins); suffix -1.553, -2.502 (1 wins)."""
    sequences = [[2, 0, 1, 2, 1], [2, 0, 3, 2, 1], [0, 1, 1, 2, 0], [0, 1, 3, 2, 0]]
    cloze = ev.ClozeSet(items=[None, None], candidates=[0, 1], answer=np.array([0, 1]),
                        tokens=[np.array(t) for t in sequences], verse_start=np.full(4, 1), blank_start=np.full(4, 2),
                        blank_end=np.full(4, 3), prefix_shared=np.ones(4, dtype=bool))
    scores = ev.score_cloze_ngram(ev.KneserNeyTrigram(np.array(TINY_CORPUS), vocab_size=5), cloze)
    reference = kn_reference(TINY_CORPUS, 5)

    def logp(seq, first):  # log-likelihood of seq[first:], each token given the two before it
        return sum(math.log(reference(seq[t - 2] if t >= 2 else -1, seq[t - 1], seq[t])) for t in range(first, 5))

    assert scores.verse.ravel() == pytest.approx([logp(s, 1) for s in sequences], rel=1e-12)
    assert scores.suffix.ravel() == pytest.approx([logp(s, 3) for s in sequences], rel=1e-12)
    assert scores.verse.round(3).tolist() == [[-4.579, -6.128], [-5.411, -4.26]]
    assert scores.suffix.round(3).tolist() == [[-3.107, -0.951], [-1.553, -2.502]]
    assert ev.prediction_shares(scores.verse).tolist() == [[1, 0], [0, 1]]
    assert ev.prediction_shares(scores.suffix).tolist() == [[0, 1], [1, 0]]


@pytest.fixture(scope="module")
def constructed_baselines(ctx):
    """The uniform model on a context whose baselines have known answers: training counts where the verse-initial
    majority ("but", tied with "then" and first in lexicon order) differs from the inside one ("for"), and a real
    trigram trained on three tokens that occur in no cloze sequence, so it gives every cloze token one probability."""
    word = ctx.lex.words.index
    counts = Counter({(word("but"), True): 5, (word("then"), True): 5, (word("for"), True): 3,
                      (word("for"), False): 9, (word("but"), False): 1})
    used = set(np.concatenate(ctx.cloze.tokens).tolist())
    unused = [t for t in range(vocab(ctx)) if t not in used][:3]
    blind = ev.KneserNeyTrigram(np.tile(unused, 20), vocab(ctx))
    constructed = dataclasses.replace(ctx, train_counts=counts, ngram=blind, slots=ctx.slots[:50])
    return ev.evaluate_model(StubLM(vocab(ctx)), constructed, progress=False)


def test_positional_majority_predicts_each_positions_own_majority(ctx, constructed_baselines):
    items = constructed_baselines["items"]["cloze"]
    assert [i["id"] for i in items] == [s.item_id for s in ctx.cloze.items]
    expected = [float(i["word"] == ("but" if i["verse_initial"] else "for")) for i in items]
    assert [i["credit"]["positional_majority"] for i in items] == expected
    assert [i["credit"]["majority"] for i in items] == [float(i["word"] == "for") for i in items]
    # both positions have items of both words, so the two baselines really differ
    assert {(i["word"], i["verse_initial"]) for i in items} >= {("for", True), ("for", False), ("but", True)}
    scorers = constructed_baselines["cloze"]["scorers"]
    assert scorers["positional_majority"]["accuracy"] == np.mean(expected)
    assert scorers["positional_majority"]["breakdowns"]["position"]["verse-initial"]["accuracy"] == np.mean(
        [i["word"] == "but" for i in items if i["verse_initial"]])


def test_ngram_baseline_scores_the_suffix_only_for_kn3_suffix(ctx, constructed_baselines):
    """A trigram that gives every token the same probability ties all candidates on the suffix (the same tokens for
    every candidate: exactly chance), and on the whole verse ranks exactly as the uniform model does."""
    K = ctx.cloze.n_candidates
    items = constructed_baselines["items"]["cloze"]
    assert [i["credit"]["kn3_suffix"] for i in items] == [round(1 / K, 6)] * len(items)
    assert [i["credit"]["kn3_verse"] for i in items] == [i["credit"]["model_verse"] for i in items]
    assert len({i["credit"]["kn3_verse"] for i in items}) > 1  # not chance: the fewest-piece candidates win


def test_ngram_and_majority_baselines_on_the_kjv(ctx, uniform_result):
    """The training counts behind both majority baselines equal a whole-word count of the training verses, in which
    "for" leads at verse starts (1,534 vs 1,390 "but") and inside (6,937): so majority given position = majority =
    the share of "for" items, exactly."""
    cfg = load_config("cpu.toml")
    train = ev.load_split_verses("kjv", cfg, "train")
    word = ctx.lex.words.index
    for w in ("for", "but", "then", "so"):
        anywhere = re.compile(rf"\b{w}\b", re.IGNORECASE)
        initial = sum(bool(re.match(rf"{w}\b", v.text, re.IGNORECASE)) for v in train)
        assert ctx.train_counts[(word(w), True)] == initial, w
        assert ctx.train_counts[(word(w), False)] == sum(len(anywhere.findall(v.text)) for v in train) - initial, w
    assert (ctx.train_counts[(word("for"), True)], ctx.train_counts[(word("but"), True)]) == (1534, 1390)
    scorers = uniform_result["cloze"]["scorers"]
    share_of_for = np.mean([i["word"] == "for" for i in uniform_result["items"]["cloze"]])
    assert scorers["majority"]["accuracy"] == scorers["positional_majority"]["accuracy"] == share_of_for
    assert scorers["kn3_verse"]["accuracy"] > 5 / ctx.cloze.n_candidates


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
                   "--out", str(out), "--json", str(tmp_path / "result.json"), "--batch-tokens", "2048",
                   "--probe-max-train", "500")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["step"] == 5 and result["corpus"] == "kjv" and result["seq_len"] == 64
    assert result["context_verses"] == 3  # the default: up to 3 preceding verses, cut to the model's 64 tokens
    assert result["checkpoint_identity"] == ev.checkpoint_identity(tiny_run) and len(
        result["checkpoint_identity"]["sha256"]) == 64 and result["checkpoint_identity"]["step"] == 5
    # a 64-token model cannot hold the longest verses: those items are skipped, and counted
    assert result["cloze"]["n_items"] + sum(result["cloze"]["skipped"].values()) == 12
    assert set(result["cloze"]["skipped"]) <= {"verse_longer_than_model"} and result["cloze"]["n_items"] >= 9
    assert set(result["cloze"]["scorers"]) == {*ev.CLOZE_SCORERS, "link_probe"}  # no link head: the probe alone
    assert result["link"]["head"] is None and result["link"]["probe"]["max_train"] == 500
    assert 400 < result["link"]["probe"]["n_train"] <= 500  # spread evenly, less the verses longer than the model
    assert re.search(r"^cloze, frozen probe \(masked, read after it\) +conjunctive +\d+", proc.stdout, re.MULTILINE)
    assert "cloze, link head" not in proc.stdout and "link: the connective masked" in proc.stdout
    assert result["next_token"]["n"] > 1000 and 0 <= result["next_token"]["accuracy"] <= 1
    assert len(result["items"]["cloze"]) == result["cloze"]["n_items"]
    for name in ("hardest_connectives", "accuracy_by_clause_length", "confusion", "accuracy_by_genre"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "cloze, whole-verse score" in proc.stdout and "clause length" in proc.stdout
    assert "cloze/model:" in proc.stderr  # progress on long work
    assert "class_head" not in result and "class head" not in proc.stdout  # a model without one
    mc = result["masked_context"]
    assert mc["k"] == 8 and mc["n"] > 1000 and mc["gap"] == pytest.approx(mc["masked_loss"] - mc["visible_loss"])
    assert "masked context: loss (nats) on the 8 tokens after each of" in proc.stdout
    # both item sets: every item record says which it is in, every summary gives both
    items = result["items"]["cloze"] + result["items"]["next_token"]
    assert all(type(item["conjunctive"]) is bool for item in items) and any(i["conjunctive"] for i in items)
    assert not all(i["conjunctive"] for i in items)
    for summary in [result["next_token"], *result["cloze"]["scorers"].values(), mc]:
        assert list(summary["sets"]) == list(ev.SETS) and summary["sets"]["all"]["n"] == summary["n"]
        assert 0 < summary["sets"]["conjunctive"]["n"] <= summary["n"]
    conjunctive_next = sum(i["conjunctive"] for i in result["items"]["next_token"])
    assert result["next_token"]["sets"]["conjunctive"]["n"] == conjunctive_next
    assert "masked context (conjunctive only): loss" in proc.stdout
    assert re.search(r"^cloze, whole-verse score +conjunctive +\d+", proc.stdout, re.MULTILINE)


def test_evaluate_cli_errors_are_one_line_with_exit_2(tiny_run, tmp_path):
    missing = run_cli("genesis.evaluate", "--checkpoint", str(tmp_path / "nope.pt"), check=False)
    bad_corpus = tmp_path / "bad.txt"
    bad_corpus.write_bytes(b"Genesis 1:1 In the beginning\n\xff\xfe broken\n")
    unreadable = run_cli("genesis.evaluate", "--checkpoint", str(tiny_run), "--corpus", str(bad_corpus),
                         "--no-plots", check=False)
    one_chapter = tmp_path / "one.txt"  # one chapter cannot fill both splits of the run's heldout_every
    one_chapter.write_text("Genesis 1:1 In the beginning God created the heaven and the earth.\n"
                           "Genesis 1:2 And the earth was without form, and void.\n")
    split = run_cli("genesis.evaluate", "--checkpoint", str(tiny_run), "--corpus", str(one_chapter), "--no-plots",
                    check=False)
    assert split.stderr.startswith(f"error: {tiny_run / 'checkpoint.pt'}: data.heldout_every: the "), split.stderr
    text = tmp_path / "text.pt"
    text.write_text("garbage\n")
    not_checkpoint = run_cli("genesis.evaluate", "--checkpoint", str(text), check=False)
    device = run_cli("genesis.evaluate", "--checkpoint", str(tiny_run), "--device", "tpu", check=False)
    probe = run_cli("genesis.evaluate", "--checkpoint", str(tiny_run), "--probe-max-train", "-1", check=False)
    other = tmp_path / "other"  # the run's checkpoint beside a tokenizer with two more ids
    other.mkdir()
    shutil.copy(tiny_run / "checkpoint.pt", other / "checkpoint.pt")
    bigger = Tokenizer.from_file(str(tiny_run / "tokenizer.json"))
    bigger.add_tokens(["qqqx", "qqqy"])
    bigger.save(str(other / "tokenizer.json"))
    tokenizer = run_cli("genesis.evaluate", "--checkpoint", str(other), "--no-plots", check=False)
    for proc, needle in ((missing, "checkpoint not found"), (unreadable, "not valid UTF-8"),
                         (split, "split is empty"), (not_checkpoint, "text.pt: not a checkpoint (not the zip"),
                         (device, "--device tpu: not a device here"),
                         (probe, "--probe-max-train: must be >= 0 (got -1)"),
                         (tokenizer, "token ids, but the model in checkpoint.pt has")):
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


def with_prefixes_that_differ(cloze: ev.ClozeSet) -> ev.ClozeSet:
    """`cloze` with two candidates whose tokens before the blank differ from their answer's (BPE never makes one):
    one token of the context changed in one, one of the verse before the blank in another."""
    cloze = dataclasses.replace(cloze, tokens=list(cloze.tokens), prefix_shared=cloze.prefix_shared.copy())
    K = cloze.n_candidates
    in_context = next(i * K + (cloze.answer[i] + 1) % K for i in range(len(cloze.items))
                      if cloze.verse_start[i * K] > 1)
    in_verse = next(i * K + (cloze.answer[i] + 2) % K for i in range(len(cloze.items))
                    if cloze.blank_start[i * K] > cloze.verse_start[i * K] + 1 and i * K != in_context // K * K)
    for j, t in ((in_context, cloze.verse_start[in_context] - 1), (in_verse, cloze.blank_start[in_verse] - 1)):
        cloze.tokens[j] = cloze.tokens[j].copy()
        cloze.tokens[j][t] = (cloze.tokens[j][t] + 1) % 100
        cloze.prefix_shared[j] = False
    return cloze


# each model and each dtype once (grouped-query attention exactly in fp32; bf16's tolerance on the other): the
# four-way product took ~2 minutes of the suite for no path the pairs leave out
@pytest.mark.parametrize("run, dtype", [("untied-head", torch.float32), ("tied", torch.bfloat16)])
def test_the_prefix_cached_cloze_scorer_gives_the_full_scorers_scores_and_picks(ctx, tiny_runs, run, dtype):
    """`score_cloze_model(path="prefix")` (each item's left context once, the candidates against its cached keys
    and values) against every candidate sequence in full, on real trained runs (4 steps; multi-head and grouped-query
    attention), with 0 and 3 verses of context cut to the runs' 64 tokens, and candidates whose prefix differs.
    Scores agree within PREFIX_PATH_TOLERANCE: 1e-4 nats in fp32 (the sums are ~300 nats, the differences ~1e-5:
    rounding of other batch shapes and kernels); 0.5 in bf16 (~0.1 seen), where a pick may change only where the
    best two are within twice that. Picks are the same."""
    model = ev.load_run(tiny_runs[run]).model.to(dtype)
    tolerance = PREFIX_PATH_TOLERANCE[dtype]
    max_len = ev.model_max_len(model)
    slots = ev.select_evenly(ctx.slots, 40)
    for verses in (0, 3):
        cloze = ev.build_cloze(ctx.eval_split, slots, ctx.tokenizer, ctx.lex, ctx.cloze.candidates, max_len, verses)
        first = cloze.verse_start[:: cloze.n_candidates]
        if verses:  # contexts cut to fit: fewer tokens than the 3 verses before (all in the chapter, in these items)
            whole = [1 + sum(len(ctx.eval_split.verse_ids[v]) for v in range(s.verse_index - 3, s.verse_index))
                     for s in cloze.items]
            assert sum(f < w for f, w in zip(first, whole)) >= 5 and (first > 1).sum() >= 20
        else:
            assert (first == 1).all()  # the separator alone
        cloze = with_prefixes_that_differ(cloze) if verses else cloze
        full = ev.score_cloze_model(model, cloze, progress=False, path="full")
        for batch_tokens in (ev.DEFAULT_BATCH_TOKENS, 300):  # one item a batch, over the budget, at 300
            cached = ev.score_cloze_model(model, cloze, batch_tokens=batch_tokens, progress=False, path="prefix")
            for a, b in ((full.verse, cached.verse), (full.suffix, cached.suffix)):
                assert 0 < np.abs(a - b).max() <= tolerance  # 0: the full path again, not the cached one
                top2 = np.sort(a, axis=1)[:, -2:]
                clear = top2[:, 1] - top2[:, 0] > 2 * tolerance
                assert np.array_equal(a.argmax(1)[clear], b.argmax(1)[clear])
                if dtype == torch.float32:
                    assert np.array_equal(a.argmax(1), b.argmax(1))
        auto = ev.score_cloze_model(model, cloze, batch_tokens=300, progress=False)  # a Llama: the cached path
        assert np.array_equal(auto.verse, cached.verse) and np.array_equal(auto.suffix, cached.suffix)
    with pytest.raises(ValueError, match="path 'prefix' needs a Llama"):
        ev.score_cloze_model(StubLM(vocab(ctx)), cloze, progress=False, path="prefix")


# ----------------------------------------------------------------------------------------------------------------
# The class head


class RecordingHead(torch.nn.Module):
    """A model with a class head whose hidden state is zero and whose head always says class `favourite`; it keeps
    every batch it is given."""

    def __init__(self, seq_len: int, favourite: int):
        super().__init__()
        self.args = SimpleNamespace(seq_len=seq_len)
        self.class_head = torch.nn.Linear(8, len(CLASSES))
        with torch.no_grad():
            self.class_head.weight.zero_()
            self.class_head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(favourite), len(CLASSES)))
        self.seen = []

    def hidden(self, idx):
        self.seen.append(idx.clone())
        return torch.zeros(*idx.shape, 8)


def test_class_head_reads_the_mask_token_after_half_a_window_of_true_context(ctx):
    """Each slot gets one window ending at its first token, which is the mask token; before it the seq_len // 2
    tokens of the stream, unmasked (fewer only at the stream's start); slots at position 0 are skipped."""
    slots, stream = ctx.slots[:40], ctx.eval_split.stream
    truth = np.array([int(ctx.lex.entry_class[s.entry]) for s in slots])
    model = RecordingHead(SEQ_LEN, favourite=1)
    scores = ev.score_class_head(model, stream, slots, truth, mask_id=7, batch_tokens=65 * 16, progress=False)
    windows = torch.cat(model.seen).numpy()
    assert windows.shape == (len([s for s in slots if s.stream_pos >= 1]), SEQ_LEN // 2 + 1)
    rows = iter(windows)
    for slot, credit in zip(slots, scores.credit):
        if slot.stream_pos < 1:
            assert math.isnan(credit)
            continue
        row, start = next(rows), max(0, slot.stream_pos - SEQ_LEN // 2)
        col = slot.stream_pos - start
        assert row[col] == 7 and np.array_equal(row[:col], stream[start:slot.stream_pos])
        assert credit == (1.0 if CLASSES[int(ctx.lex.entry_class[slot.entry])] == "contrastive" else 0.0)
    assert np.array_equal(scores.shares[~np.isnan(scores.credit)].argmax(1), np.ones(len(windows)))


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("head") / "run"
    run_cli("genesis.train", "--config", "cpu.toml", "--out", str(out), *TINY, "--set", "masking.enabled=true",
            "--set", "model.class_head=true")
    return out


def test_evaluate_cli_reports_the_class_head_against_the_majority_class(head_run, tmp_path):
    proc = run_cli("genesis.evaluate", "--checkpoint", str(head_run), "--max-items", "12", "--no-plots",
                   "--probe-max-train", "300", "--json", str(tmp_path / "result.json"))
    result = json.loads((tmp_path / "result.json").read_text())
    head = result["class_head"]
    n, by_class = head["model"]["n"], head["model"]["breakdowns"]["class"]
    assert n == result["next_token"]["n"] > 1000  # the same slots: every one with context
    matrix = np.array(head["confusion"]["matrix"])
    assert head["labels"] == list(CLASSES) and matrix.sum() == pytest.approx(n)
    for label, row in zip(CLASSES, matrix):
        assert row.sum() == pytest.approx(by_class.get(label, {"n": 0})["n"])
    assert head["model"]["accuracy"] == pytest.approx(np.trace(matrix) / n)
    majority = head["majority_class"]
    assert majority["class"] == "causal" and majority["accuracy"] == pytest.approx(by_class["causal"]["n"] / n)
    assert "class head (mask token -> type)" in proc.stdout and "confusion (rows: true class)" in proc.stdout
    conjunctive = head["model"]["sets"]["conjunctive"]
    assert conjunctive["n"] == result["next_token"]["sets"]["conjunctive"]["n"] < n
    assert head["majority_class"]["sets"]["conjunctive"]["n"] == conjunctive["n"]
    assert re.search(rf"^conjunctive uses +{conjunctive['n']} ", proc.stdout, re.MULTILINE)


# ----------------------------------------------------------------------------------------------------------------
# The link metric and the frozen probe


@pytest.fixture(scope="module")
def masker_tables(ctx):
    """The masker's own tables for the run's lexicon: its clause stops, glue and word ends."""
    from genesis.masking import ConnectiveMasker

    masker = ConnectiveMasker.from_tokenizer(ctx.tokenizer, ctx.cfg.masking, mask_token=ctx.cfg.tokenizer.mask_token,
                                             readout=True, log=None)
    return masker.tables("cpu")


def masker_readout(tables, row: np.ndarray, start: int, end: int, entry: int) -> tuple[int | None, int | None]:
    """(readout position, readout start) the masker's oracle gives the one masked word at columns [start, end)."""
    from genesis.masking import readout_reference

    masked = [start <= c < end for c in range(len(row))]
    readout, readout_start = readout_reference(row.tolist(), masked, [entry if m else -1 for m in masked], tables)
    targets = [c for c, e in enumerate(readout) if e >= 0]
    assert len(targets) <= 1 and all(readout[c] == entry for c in targets)
    return (targets[0], readout_start[targets[0]]) if targets else (None, None)


def test_link_items_are_the_cloze_answers_masked_and_read_where_the_masker_reads(ctx, masker_tables):
    """Each held-out link item is the whole-verse cloze's answer sequence (its context included) with the slot's
    pieces replaced by the mask token, cut after the readout position the masker's oracle gives that word."""
    cloze, items, K = ctx.cloze, ctx.link_heldout, ctx.cloze.n_candidates
    mask_id = find_mask_id(ctx.tokenizer, ctx.cfg.tokenizer.mask_token)
    assert len(items) == len(cloze.items) and np.array_equal(items.label, cloze.answer)
    cut = 0
    for i, slot in enumerate(cloze.items):
        seq = cloze.tokens[i * K + cloze.answer[i]]
        start, end = int(cloze.blank_start[i * K + cloze.answer[i]]), int(cloze.blank_end[i * K + cloze.answer[i]])
        assert np.array_equal(seq[start:end], ctx.eval_split.stream[slot.stream_pos : slot.stream_pos + slot.n_pieces])
        position, readout_start = masker_readout(masker_tables, seq, start, end, slot.entry)
        assert items.no_readout[i] == (position is None)
        position = len(seq) - 1 if position is None else position
        assert items.readout[i] == position == len(items.tokens[i]) - 1 and items.readout_start[i] == end
        assert readout_start in (None, end)
        masked = seq.copy()
        masked[start:end] = mask_id
        assert np.array_equal(items.tokens[i], masked[: position + 1])
        cut += position < len(seq) - 1
    assert cut > len(items) // 2  # most verses go on past the clause the word opens


def test_the_probes_items_are_built_as_the_heldout_items_are(ctx, masker_tables):
    """`train_link_items` on the held-out split's cloze slots gives the held-out link items: the same verse, masked
    word and readout, after the same context (cut, if at all, only by the verse's own length, not the longest
    candidate's); and on the training split, training occurrences read where the masker reads them."""
    from genesis.evaluate.link_metric import clause_stops, train_link_items

    mask_id = find_mask_id(ctx.tokenizer, ctx.cfg.tokenizer.mask_token)
    stops = clause_stops(ctx.lex, vocab(ctx))
    again, skipped = train_link_items(ctx.eval_split, ctx.cloze.items, ctx.tokenizer, ctx.cloze.candidates, SEQ_LEN,
                                      ctx.context_verses, mask_id, stops, max_items=0)
    held = ctx.link_heldout
    assert skipped == {} and len(again) == len(held) and np.array_equal(again.label, held.label)
    for i in range(len(held)):
        shift = len(again.tokens[i]) - len(held.tokens[i])  # a longer context, where the cloze had to cut it
        assert shift >= 0 and np.array_equal(again.tokens[i][shift:], held.tokens[i])
        assert again.readout[i] - shift == held.readout[i] and again.readout_start[i] - shift == held.readout_start[i]
    train = ctx.link_train
    assert len(train) == ctx.probe_max_train == 2000 and train.no_readout.sum() < len(train) // 50
    counts = np.bincount(train.label, minlength=ctx.cloze.n_candidates)
    assert counts[ctx.cloze.candidates.index(ctx.lex.words.index("for"))] == counts.max()
    stop = masker_tables.clause_stop.tolist()
    for i in range(0, len(train), 7):
        row, start = train.tokens[i], int(train.readout_start[i])
        assert row[start - 1] == mask_id and len(row) <= SEQ_LEN
        position = readout_position(row.tolist(), start - 1, stop)  # the row is cut after it: it is the last column
        assert position == (None if train.no_readout[i] else len(row) - 1) and train.readout[i] == len(row) - 1


def first_link_items(items, n: int):
    return dataclasses.replace(items, tokens=items.tokens[:n], readout=items.readout[:n],
                               readout_start=items.readout_start[:n], label=items.label[:n],
                               no_readout=items.no_readout[:n])


def small_llama(ctx, link_head: torch.nn.Module | None = None, readout: str = "span"):
    """A 2 x 64 Llama (seed 0), with `link_head` and `args.link_readout` attached as the trainer's model has them."""
    from genesis.model import Llama, ModelArgs

    torch.manual_seed(0)
    model = Llama(ModelArgs(vocab_size=vocab(ctx), n_layers=2, dim=64, n_heads=2, n_kv_heads=2, ffn_dim=128,
                            seq_len=SEQ_LEN)).eval()
    if link_head is not None:
        model.link_head = link_head
        model.args.link_readout = readout
    return model


def constant_head(ctx, word: str) -> torch.nn.Linear:
    """A link head that names `word` whatever it reads."""
    head = torch.nn.Linear(64, len(ctx.lex.words))
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[ctx.lex.words.index(word)] = 1.0
    return head


@pytest.fixture(scope="module")
def link_result(ctx):
    """A whole evaluation of a real (random) Llama whose link head always names "for"."""
    return ev.evaluate_model(small_llama(ctx, constant_head(ctx, "for"), "stop"), ctx, progress=False)


def test_a_link_head_that_always_names_one_word_scores_that_words_share(ctx, link_result):
    answers = [ctx.lex.words[s.entry] for s in ctx.cloze.items]
    head = link_result["cloze"]["scorers"]["link_head"]
    assert head["accuracy"] == pytest.approx(answers.count("for") / len(answers)) == pytest.approx(
        link_result["cloze"]["scorers"]["majority"]["accuracy"])
    assert head["breakdowns"]["word"]["for"]["accuracy"] == 1.0 and head["breakdowns"]["word"]["but"]["accuracy"] == 0
    credits = [item["credit"]["link_head"] for item in link_result["items"]["cloze"]]
    assert credits == [float(w == "for") for w in answers]
    conjunctive = [w for w, s in zip(answers, ctx.cloze.items) if s.conjunctive]
    assert head["sets"]["conjunctive"]["accuracy"] == pytest.approx(conjunctive.count("for") / len(conjunctive))
    assert head["sets"]["conjunctive"]["breakdowns"]["word"]["for"] == {"accuracy": 1.0,
                                                                        "n": conjunctive.count("for")}
    link = link_result["link"]
    assert link["head"] == {"readout": "stop", "outputs": len(ctx.lex.words)} and link["readout"] == "stop"
    assert link["probe"]["readout"] == "stop" and link["probe"]["readout_from"] == "model.link_readout"
    assert link["n_items"] == len(ctx.cloze.items) and link["no_readout"] == int(ctx.link_heldout.no_readout.sum())
    assert link["probe"]["n_train"] == len(ctx.link_train) and link["probe"]["l2"] > 0
    assert {"link_heldout_s", "link_probe_s"} <= set(link_result["timings"])
    assert np.array(link_result["cloze"]["confusion"]["matrices"]["link_head"])[:, ctx.candidate_words.index(
        "for")].sum() == pytest.approx(len(answers))


class OracleLinkModel(torch.nn.Module):
    """Hidden states that are the one-hot lexicon entry of the word masked in the row, found by the row up to its
    last mask token in a table built from the cloze answers: a wrongly masked row is a KeyError. With an identity
    link head, the head names the right word wherever it reads, over a span or at one position."""

    def __init__(self, ctx, readout: str, known: dict[tuple, int]):
        super().__init__()
        self.known, self.entries = known, len(ctx.lex.words)
        self.mask_id = find_mask_id(ctx.tokenizer, ctx.cfg.tokenizer.mask_token)
        self.args = SimpleNamespace(seq_len=SEQ_LEN, link_readout=readout)
        self.link_head = torch.nn.Linear(self.entries, self.entries)
        torch.nn.init.eye_(self.link_head.weight)
        torch.nn.init.zeros_(self.link_head.bias)

    def hidden(self, idx):
        h = torch.zeros(*idx.shape, self.entries)
        for b, row in enumerate(idx.tolist()):
            last = max(c for c, t in enumerate(row) if t == self.mask_id)
            h[b, :, self.known[tuple(row[: last + 1])]] = 1.0
        return h


@pytest.mark.parametrize("readout", ["stop", "span"])
def test_a_link_head_that_reads_the_hidden_word_scores_100_percent_and_so_does_the_probe(ctx, readout):
    from genesis.evaluate.link_metric import score_link

    mask_id, K = find_mask_id(ctx.tokenizer, ctx.cfg.tokenizer.mask_token), ctx.cloze.n_candidates
    known = {}
    for i, slot in enumerate(ctx.cloze.items):
        j = i * K + ctx.cloze.answer[i]
        row = ctx.cloze.tokens[j][: ctx.cloze.blank_end[j]].copy()
        row[ctx.cloze.blank_start[j] :] = mask_id
        known[tuple(row.tolist())] = slot.entry
    train = ctx.link_train  # the probe's rows: the mask run ends at the readout start
    for tokens, start, label in zip(train.tokens, train.readout_start, train.label):
        known[tuple(tokens[:start].tolist())] = ctx.cloze.candidates[label]
    scores, info, _ = score_link(OracleLinkModel(ctx, readout, known), ctx.link_heldout, train, ctx.cloze.candidates,
                                 len(ctx.lex.words), progress=False)
    for name in ("link_head", "link_probe"):
        assert np.array_equal(scores[name].argmax(1), ctx.cloze.answer), name
    assert info["head"]["readout"] == info["probe"]["readout"] == readout


def test_the_probe_is_deterministic_and_fits_a_separable_case():
    from genesis.evaluate.link_metric import fit_probe

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6)) * 6.0
    labels = np.arange(400) % 4
    x = torch.from_numpy(centres[labels] + rng.normal(size=(400, 6)))
    x = torch.cat([x, torch.full((400, 1), 3.0, dtype=torch.float64)], dim=1)  # a constant feature: scale 1
    first, second = fit_probe(x, labels, 5), fit_probe(x, labels, 5)  # class 4 never occurs
    for a, b in ((first.weight, second.weight), (first.bias, second.bias)):
        assert torch.equal(a, b)
    assert first.scale[-1] == 1.0 and first.iterations > 0 and math.isfinite(first.loss)
    assert np.array_equal(first.logits(x).argmax(1).numpy(), labels)
    fresh = np.arange(100) % 4
    y = torch.cat([torch.from_numpy(centres[fresh] + rng.normal(size=(100, 6))), torch.full((100, 1), 3.0,
                                                                                           dtype=torch.float64)], 1)
    assert np.array_equal(first.logits(y).argmax(1).numpy(), fresh)
    with pytest.raises(ev.EvalError, match="no training occurrence"):
        fit_probe(x[:0], labels[:0], 5)


def test_a_model_without_a_link_head_gets_the_probe_alone_on_the_default_readout_and_twice_the_same(ctx):
    from genesis.evaluate.link_metric import PROBE_READOUT, score_link

    model, train = small_llama(ctx), first_link_items(ctx.link_train, 400)
    runs = [score_link(model, ctx.link_heldout, train, ctx.cloze.candidates, len(ctx.lex.words), progress=False)
            for _ in range(2)]
    (scores, info, timings), (again, _, _) = runs
    assert set(scores) == {"link_probe"} and info["head"] is None and "link_heldout_s" in timings
    assert info["readout"] == info["probe"]["readout"] == PROBE_READOUT and info["probe"]["readout_from"] == "default"
    assert info["probe"]["n_train"] == 400 and scores["link_probe"].shape == (len(ctx.cloze.items),
                                                                             ctx.cloze.n_candidates)
    assert np.array_equal(scores["link_probe"], again["link_probe"])
    wrong = small_llama(ctx, torch.nn.Linear(64, 3))
    with pytest.raises(ev.EvalError, match="link head has 3 outputs; the run's lexicon has"):
        score_link(wrong, ctx.link_heldout, train, ctx.cloze.candidates, len(ctx.lex.words), progress=False)


def test_the_tables_give_the_link_scorers_beside_the_verse_cloze_and_the_baselines(ctx, link_result):
    text = ev.format_tables({**link_result, "checkpoint": "x", "step": 0, "corpus": "kjv", "split": "heldout",
                             "train_corpus": "kjv"})
    sc = link_result["cloze"]["scorers"]
    for title, scorer in (("cloze, link head", "link_head"), ("cloze, frozen probe", "link_probe")):
        rows = [line for line in text.splitlines() if line.startswith(title)]
        assert [row.split(") ")[1].split()[0] for row in rows] == ["all", "conjunctive"]
        assert rows[0].split()[-4] == f"{100 * sc[scorer]['accuracy']:.1f}"
        assert rows[0].split()[-3] == f"{100 * sc['kn3_verse']['accuracy']:.1f}"
    assert "link: the connective masked, read at its clause stop (readout stop;" in text
    header = next(line for line in text.splitlines() if line.split()[:6] == ["n", "verse", "head", "probe", "KN-3",
                                                                               "major."])
    assert header.split().count("probe") == 2  # all and conjunctive
    row = next(line for line in text.splitlines() if line.startswith("word for "))
    cells = row.split()[2:]
    n_for = sc["model_verse"]["breakdowns"]["word"]["for"]["n"]
    assert cells[0] == str(n_for) and cells[2] == "100.0"  # the head always names "for"
    assert any(line.startswith("class causal ") for line in text.splitlines())


# ----------------------------------------------------------------------------------------------------------------
# Masked context


class BigramLM(StubLM):
    """Logits at each position from the input token there only: a hidden connective changes the prediction of the
    token right after it and nothing else."""

    def __init__(self, table: torch.Tensor, seq_len: int):
        super().__init__(table.shape[0], seq_len)
        self.table = table

    def logits(self, idx, zeros):
        return self.table[idx]


def _bigram_case(seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """A 300-token stream over ids 0..38 (39 is the mask id) and a random 40 x 40 bigram logit table."""
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, 39, size=300).astype(np.int64)
    return stream, torch.from_numpy(rng.normal(size=(40, 40))).float()


def _slot_at(pos: int, n_pieces: int) -> ev.Slot:
    return ev.Slot(f"s{pos}", 0, pos, n_pieces, 0, False, 5, -1, -1, "Genesis", "law")


def test_masked_context_loss_differs_from_the_visible_one_only_through_the_masked_pieces():
    stream, table = _bigram_case(7)
    mask_id, k, slot = 39, 3, _slot_at

    # two pieces at the stream's start; a word followed by another within k tokens; one at the very end (nothing
    # follows: skipped); windows of 16 tokens, 3 to a batch
    slots = [slot(0, 2), slot(40, 1), slot(42, 1), slot(100, 1), slot(250, 2), slot(299, 1)]
    scores = ev.score_masked_context(BigramLM(table, seq_len=16), stream, slots, mask_id, k, batch_tokens=48,
                                     progress=False)
    masked = ev.masked_stream(stream, slots, mask_id)
    assert (masked != stream).sum() == sum(s.n_pieces for s in slots) and (masked[[0, 1, 40, 42, 299]] == mask_id).all()
    logp = torch.log_softmax(table, dim=-1).double().numpy()
    for i, s in enumerate(slots):
        targets = [t for t in range(s.stream_pos + s.n_pieces, s.stream_pos + s.n_pieces + k) if t < len(stream)]
        if not targets:
            assert math.isnan(scores.visible[i]) and math.isnan(scores.masked[i])
            continue
        assert scores.visible[i] == pytest.approx(-np.mean([logp[stream[t - 1], stream[t]] for t in targets]))
        assert scores.masked[i] == pytest.approx(-np.mean([logp[masked[t - 1], stream[t]] for t in targets]))
        # the first target follows the slot's (masked) last piece; slot 40's third follows the masked slot at 42
        differ = [t for t in targets if masked[t - 1] != stream[t - 1]]
        assert differ and (scores.masked[i] != pytest.approx(scores.visible[i]))
    assert not np.isnan(scores.visible[:5]).any()


def test_deleted_context_predicts_each_token_from_the_stream_less_the_slots():
    """The deletion variant on a bigram model, where the answer is known: each of the k tokens after a slot is
    predicted from the last token before it that is no slot piece (the slot's own pieces and a slot inside the k
    tokens are skipped, not masked); a target with nothing left before it (after the slot opening the stream) is
    left out."""
    from genesis.evaluate.scorers import deleted_stream

    stream, table = _bigram_case(11)
    mask_id, k, slot = 39, 3, _slot_at
    slots = [slot(0, 2), slot(40, 1), slot(42, 1), slot(100, 2), slot(250, 2), slot(299, 1)]
    scores = ev.score_masked_context(BigramLM(table, seq_len=16), stream, slots, mask_id, k, batch_tokens=48,
                                     progress=False)
    shortened, kept_before = deleted_stream(stream, slots)
    pieces = {0, 1, 40, 42, 100, 101, 250, 251, 299}
    assert len(shortened) == 300 - len(pieces) and kept_before[2] == 0 and kept_before[43] == 40 - 2 + 1
    logp = torch.log_softmax(table, dim=-1).double().numpy()
    for i, s in enumerate(slots):
        targets = [t for t in range(s.stream_pos + s.n_pieces, s.stream_pos + s.n_pieces + k) if t < len(stream)]
        if not targets:
            assert math.isnan(scores.deleted[i])
            continue
        before = [max((u for u in range(t) if u not in pieces), default=None) for t in targets]
        expected = [logp[stream[b], stream[t]] for t, b in zip(targets, before) if b is not None]
        assert scores.deleted[i] == pytest.approx(-np.mean(expected)), s
    assert scores.deleted[0] == pytest.approx(-np.mean([logp[stream[2], stream[3]], logp[stream[3], stream[4]]]))
    # slot 40's targets 41 (after 39), 42 (the slot at 42: predicted from 41) and 43 (from 41, as 42 is gone)
    assert scores.deleted[1] == pytest.approx(-np.mean([logp[stream[39], stream[41]], logp[stream[41], stream[42]],
                                                        logp[stream[41], stream[43]]]))


def test_deleted_context_on_a_real_model_equals_one_forward_over_the_shortened_stream():
    """A (randomly initialised) Llama over a stream shorter than its context: the scorer's deleted losses are the
    shortened stream's next-token losses from a single forward pass, and differ from the visible ones."""
    from genesis.evaluate.scorers import deleted_stream
    from genesis.model import Llama, ModelArgs

    torch.manual_seed(0)
    model = Llama(ModelArgs(vocab_size=50, n_layers=2, dim=32, n_heads=2, n_kv_heads=2, ffn_dim=64, seq_len=64)).eval()
    stream = np.random.default_rng(5).integers(0, 49, size=60).astype(np.int64)

    def slot(pos: int, n_pieces: int) -> ev.Slot:
        return ev.Slot(f"s{pos}", 0, pos, n_pieces, 0, False, 5, -1, -1, "Genesis", "law")

    slots, k = [slot(5, 1), slot(9, 2), slot(30, 1), slot(33, 1)], 4
    scores = ev.score_masked_context(model, stream, slots, 49, k, progress=False)
    shortened, kept_before = deleted_stream(stream, slots)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.from_numpy(shortened)[None])[0][0].double(), dim=-1).numpy()
    for i, s in enumerate(slots):
        targets = range(s.stream_pos + s.n_pieces, s.stream_pos + s.n_pieces + k)
        expected = -np.mean([logp[kept_before[t] - 1, stream[t]] for t in targets])
        assert scores.deleted[i] == pytest.approx(expected, rel=1e-5)
    assert not np.allclose(scores.deleted, scores.visible)


def test_masked_context_result_is_the_mean_over_slots_of_the_run_mask_tokens_scores(ctx):
    """On a model whose prediction depends on the token before (a low-rank bigram), the result's losses are the
    means of the scorer's per-slot losses with the tokenizer's [MASK] hiding the connectives: not the visible
    stream twice, not another mask id."""
    V = vocab(ctx)
    g = torch.Generator().manual_seed(3)
    emb, out = torch.randn(V, 8, generator=g), torch.randn(8, V, generator=g)

    class LowRankBigram(StubLM):
        def logits(self, idx, zeros):
            return emb[idx] @ out

    model, k = LowRankBigram(V), 4
    result = ev.masked_context_result(model, ctx, k, progress=False)
    mask_id = ctx.tokenizer.token_to_id("[MASK]")
    scores = ev.score_masked_context(model, ctx.eval_split.stream, ctx.slots, mask_id, k, progress=False)
    scored = ~np.isnan(scores.visible)
    assert result["n"] == scored.sum() >= 300 and result["k"] == k
    assert result["visible_loss"] == pytest.approx(scores.visible[scored].mean(), rel=1e-9)
    assert result["masked_loss"] == pytest.approx(scores.masked[scored].mean(), rel=1e-9)
    assert abs(result["gap"]) > 1e-3  # the hidden connective changed the next token's prediction
    assert result["deleted_loss"] == pytest.approx(scores.deleted[scored].mean(), rel=1e-9)
    assert result["deletion_gap"] == pytest.approx(result["deleted_loss"] - result["visible_loss"], rel=1e-9)
    assert abs(result["deletion_gap"]) > 1e-3
    conjunctive = scored & np.array([s.conjunctive for s in ctx.slots])
    assert result["sets"]["conjunctive"]["n"] == conjunctive.sum() < result["n"]
    assert result["sets"]["conjunctive"]["masked_loss"] == pytest.approx(scores.masked[conjunctive].mean(), rel=1e-9)
    assert result["sets"]["conjunctive"]["gap"] == pytest.approx(
        scores.masked[conjunctive].mean() - scores.visible[conjunctive].mean(), rel=1e-9)
    assert {k: result["sets"]["all"][k] for k in ("n", "visible_loss", "masked_loss", "gap", "deleted_loss")} == {
        k: result[k] for k in ("n", "visible_loss", "masked_loss", "gap", "deleted_loss")}
    other = ev.score_masked_context(model, ctx.eval_split.stream, ctx.slots, mask_id - 1, k, progress=False)
    assert other.masked[scored].mean() != pytest.approx(result["masked_loss"], rel=1e-6)


def test_masked_context_lands_in_the_result_and_a_uniform_model_has_no_gap(ctx, uniform_result):
    mc = uniform_result["masked_context"]
    assert mc["k"] == ev.DEFAULT_CONTEXT_K == 8 and mc["n"] == len(ctx.slots)  # every held-out slot is followed
    assert mc["visible_loss"] == pytest.approx(math.log(vocab(ctx))) and mc["masked_loss"] == pytest.approx(
        mc["visible_loss"]) and mc["gap"] == pytest.approx(0.0, abs=1e-9)
    assert mc["deleted_loss"] == pytest.approx(mc["visible_loss"]) and mc["deletion_gap"] == pytest.approx(0, abs=1e-9)
    assert "masked context: loss (nats) on the 8 tokens after each of" in ev.format_tables(
        {**uniform_result, "checkpoint": "x", "step": 0, "corpus": "kjv", "split": "heldout", "train_corpus": "kjv"})


# The cloze as an lm-evaluation-harness task


@pytest.fixture(scope="module")
def lm_eval_task(tiny_run, tmp_path_factory):
    """The tiny run's first 60 cloze items exported as lm-eval tasks, and genesis.evaluate's result on them."""
    root = tmp_path_factory.mktemp("lm-eval")
    proc = run_cli("genesis.evaluate", "--checkpoint", str(tiny_run), "--max-items", "60", "--lm-eval-task",
                   str(root / "task"))
    run_cli("genesis.evaluate", "--checkpoint", str(tiny_run), "--max-items", "60", "--no-plots", "--quiet",
            "--probe-max-train", "300", "--json", str(root / "eval.json"))  # the probe is not what is compared
    return SimpleNamespace(dir=root / "task", stdout=proc.stdout, result=json.loads((root / "eval.json").read_text()),
                           info=json.loads((root / "task" / "genesis_cloze.json").read_text()))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_lm_eval_task_holds_the_items_genesis_scores_in_both_sets(lm_eval_task, tiny_run):
    docs = read_jsonl(lm_eval_task.dir / "genesis_cloze_all.jsonl")
    items = lm_eval_task.result["items"]["cloze"]
    assert [d["id"] for d in docs] == [i["id"] for i in items] and lm_eval_task.info["left_out"] == {}
    assert [d["conjunctive"] for d in docs] == [i["conjunctive"] for i in items]
    assert read_jsonl(lm_eval_task.dir / "genesis_cloze_conjunctive.jsonl") == [d for d in docs if d["conjunctive"]]
    candidates = lm_eval_task.result["cloze"]["candidates"]
    tokenizer = Tokenizer.from_file(str(tiny_run / "tokenizer.json"))
    newline = tokenizer.encode("\n", add_special_tokens=False).ids
    assert lm_eval_task.info["prefix_token_id"] == newline[0] and len(newline) == 1
    for doc, item in zip(docs, items):
        assert len(doc["choices"]) == len(candidates) and candidates[doc["answer"]] == doc["word"] == item["word"]
        # the verse with each candidate in the slot, cased like the original, and its newline
        verse = doc["choices"][doc["answer"]]
        assert verse.endswith("\n") and verse.count("\n") == 1
        start = int(item["id"].rsplit("@", 1)[1])
        assert verse[start:].lower().startswith(doc["word"])
        assert all(c[:start] == verse[:start] for c in doc["choices"])
        # a chapter's first verse: an empty context (lm-eval then conditions on prefix_token_id = "\n"); else the
        # preceding verses (cut to the model's 64 tokens), each with its newline
        assert doc["context"] == "" if parse_item_id(item["id"])[2] == 1 else doc["context"].endswith("\n")
    assert any(d["context"] == "" for d in docs) and any(d["context"].count("\n") >= 3 for d in docs)
    yaml = (lm_eval_task.dir / "genesis_cloze_all.yaml").read_text()
    for line in ("task: genesis_cloze_all", "output_type: multiple_choice", 'target_delimiter: ""',
                 f'    test: "{lm_eval_task.dir.resolve() / "genesis_cloze_all.jsonl"}"', "  - metric: acc"):
        assert line in yaml.splitlines()
    command = (f"lm_eval --model hf --model_args pretrained={tiny_run}-hf,dtype=float32,prefix_token_id={newline[0]} "
               f"--include_path {lm_eval_task.dir} --tasks genesis_cloze_all,genesis_cloze_conjunctive")
    assert command in lm_eval_task.stdout
    a_file = lm_eval_task.dir / "genesis_cloze.json"
    refused = run_cli("genesis.evaluate", "--checkpoint", str(tiny_run), "--lm-eval-task", str(a_file), "--quiet",
                      check=False)
    assert refused.returncode == 2 and refused.stderr == f"error: {a_file}: not a directory\n"


def test_harness_tokens_are_the_cloze_sequences_and_an_item_lm_eval_would_see_differently_is_left_out(tiny_run):
    from genesis.evaluate.lm_eval_task import harness_tokens, task_documents
    from genesis.evaluate.pipeline import build_items
    from genesis.evaluate.run import load_run

    run = load_run(tiny_run)
    items = build_items(run.cfg, run.tokenizer, 64, "kjv", max_items=20, context_verses=3, say=lambda _: None)
    cloze, words = items.cloze, [items.lex.words[c] for c in items.cloze.candidates]
    texts = [ev.items.candidate_texts(items.eval_split.verses[s.verse_index].text, s,
                                      [ev.cased_like(items.eval_split.verses[s.verse_index].text[s.char_start:
                                                                                                 s.char_end], w)
                                       for w in words]) for s in cloze.items]
    task = task_documents(cloze, run.tokenizer, words, texts)
    K, newline = cloze.n_candidates, run.tokenizer.encode("\n", add_special_tokens=False).ids[0]
    assert len(task.docs) == len(cloze.items)
    for i, doc in enumerate(task.docs):
        for k, choice in enumerate(doc["choices"]):
            ids, scored_from = harness_tokens(run.tokenizer, doc["context"], choice, newline)
            assert ids == cloze.tokens[i * K + k].tolist() and scored_from <= cloze.verse_start[i * K + k]
    # lm-eval would move "\n" into the continuation and find an empty context: refused, as lm-eval asserts
    assert harness_tokens(run.tokenizer, "\n", "And God said.\n", newline) == ([], 0)
    # a candidate whose text does not encode to the cloze's tokens: the item is left out and counted
    texts[0] = [t.replace(" ", "  ", 1) for t in texts[0]]
    assert task_documents(cloze, run.tokenizer, words, texts).left_out == {"tokens_differ_in_lm_eval": 1}


def test_lm_eval_picks_what_genesis_picks_on_every_item_of_an_exported_run(lm_eval_task, tiny_run, tmp_path,
                                                                          monkeypatch):
    """lm-eval's own harness on the exported run: its accuracy is Genesis's whole-verse cloze, item by item."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))  # the json loader's cache, read at import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval", reason='lm-eval is a test extra: pip install "genesis-masking[lm-eval]"')
    from lm_eval.tasks import TaskManager

    from genesis import export

    model_dir = tmp_path / "hf"
    assert export.main(["--checkpoint", str(tiny_run), "--out", str(model_dir)]) == 0
    prefix = lm_eval_task.info["prefix_token_id"]
    out = lm_eval.simple_evaluate(model="hf",
                                  model_args=f"pretrained={model_dir},dtype=float32,prefix_token_id={prefix}",
                                  tasks=["genesis_cloze_all", "genesis_cloze_conjunctive"], batch_size=16, device="cpu",
                                  task_manager=TaskManager(include_path=str(lm_eval_task.dir)), log_samples=True)
    result = lm_eval_task.result
    candidates = result["cloze"]["candidates"]
    genesis_pick = {i["id"]: i["predicted"]["model_verse"] for i in result["items"]["cloze"]}
    # Genesis's whole-verse scores of the same items: lm-eval's log-likelihoods differ from them by one constant per
    # item (its context's scored newline), so the differences between candidates agree, chapter openings included
    run = ev.load_run(tiny_run)
    items = ev.build_items(run.cfg, run.tokenizer, 64, "kjv", max_items=60, context_verses=3, say=lambda _: None)
    verse = ev.score_cloze_model(run.model, items.cloze, progress=False).verse
    row = {slot.item_id: i for i, slot in enumerate(items.cloze.items)}
    for name in ("all", "conjunctive"):
        samples = out["samples"][f"genesis_cloze_{name}"]
        assert len(samples) == result["cloze"]["scorers"]["model_verse"]["sets"][name]["n"]
        picks = {s["doc"]["id"]: candidates[int(np.argmax([float(r[0]) for r in s["filtered_resps"]]))]
                 for s in samples}
        assert picks == {i: genesis_pick[i] for i in picks}
        for s in samples:
            theirs, ours = np.array([float(r[0]) for r in s["filtered_resps"]]), verse[row[s["doc"]["id"]]]
            assert np.abs((theirs - theirs[0]) - (ours - ours[0])).max() < 1e-3, s["doc"]["id"]
        acc = out["results"][f"genesis_cloze_{name}"]["acc,none"]
        assert acc == pytest.approx(result["cloze"]["scorers"]["model_verse"]["sets"][name]["accuracy"], abs=1e-12)
