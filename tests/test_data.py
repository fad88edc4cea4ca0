"""Data: verse_start alignment, the held-out split, the token cache and deterministic batches."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from genesis.config import DataConfig, load_config
from genesis.data import eval_starts, get_batch, is_heldout, prepare, split_verses, tokenize_verses, window_starts


def test_verse_start_lands_on_first_token_of_every_verse(kjv_corpus):
    """Decoding from each flagged token to the next reproduces each held-out and training verse exactly."""
    tok = kjv_corpus.tokenizer
    for name in ("train", "heldout"):
        data, verses = kjv_corpus.splits[name], kjv_corpus.verses[name]
        flags = np.flatnonzero(data.verse_start)
        assert len(flags) == len(verses)
        bounds = list(flags) + [len(data)]
        ids = np.asarray(data.tokens)
        for i in range(0, len(verses), 7 if name == "train" else 1):  # every 7th training verse keeps this fast
            assert tok.decode(ids[bounds[i]:bounds[i + 1]].tolist()) == verses[i].text + "\n", verses[i]
        # book and chapter ids are aligned too
        for i in (0, len(verses) // 2, len(verses) - 1):
            assert kjv_corpus.books[data.book[flags[i]]] == verses[i].book
            assert data.chapter[flags[i]] == verses[i].chapter


def test_verse_start_with_a_metaspace_tokenizer(kjv):
    """A tokenizer whose tokens carry the space before a word: flags still land on each verse's first token."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace("\n", " ")  # newlines become spaces, merged into the next token
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([v.text for v in kjv[:3000]], trainers.BpeTrainer(vocab_size=2000, show_progress=False))
    verses = kjv[:300]
    arrays = tokenize_verses(verses, tok, ["Genesis"])
    flags = np.flatnonzero(arrays["verse_start"])
    assert len(flags) == len(verses)
    pieces = [tok.id_to_token(int(t)) for t in arrays["tokens"][flags]]
    for verse, piece in zip(verses, pieces):
        assert piece.lstrip("\u2581") and verse.text.startswith(piece.lstrip("\u2581")[:1]), (verse, piece)


def test_split_is_by_whole_chapters_and_disjoint(kjv):
    cfg = DataConfig()
    split = split_verses(kjv, cfg)
    train_ch = {(v.book, v.chapter) for v in split["train"]}
    held_ch = {(v.book, v.chapter) for v in split["heldout"]}
    assert not train_ch & held_ch
    assert len(train_ch) + len(held_ch) == 1189
    assert 0.03 < len(held_ch) / 1189 < 0.07  # "1 in 20"
    assert len(split["train"]) + len(split["heldout"]) == len(kjv)
    # the rule is a pure function of (book, chapter): the same chapters are held out in the ASV
    assert all(is_heldout(b, c, cfg) for b, c in held_ch)


def test_heldout_books(kjv):
    split = split_verses(kjv, DataConfig(heldout_books=["Jude", "Ruth"]))
    held_books = {v.book for v in split["heldout"]}
    assert {"Jude", "Ruth"} <= held_books
    assert not {v.book for v in split["train"]} & {"Jude", "Ruth"}
    from genesis.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(f"data.heldout_books: not in the corpus: Judas{JUDAS}")):
        split_verses(kjv, DataConfig(heldout_books=["Judas"]))


JUDAS = " (did you mean 'Judges', 'Jude' or 'James'?)"  # the corpus's closest book names


def test_split_errors_name_the_config_file_or_the_set(tmp_path):
    """A held-out book the corpus lacks, or a split left empty: one line naming where the value came from."""
    from genesis.config import ConfigError

    with pytest.raises(ConfigError) as err:
        prepare(load_config("cpu.toml", overrides=['data.heldout_books=["Judas"]']))
    assert str(err.value) == '--set data.heldout_books=["Judas"]: data.heldout_books: not in the corpus: Judas' + JUDAS
    path = tmp_path / "mine.toml"
    path.write_text('[data]\nheldout_books = ["Judas", "Jude"]\n')
    with pytest.raises(ConfigError) as err:
        prepare(load_config(str(path)))
    assert str(err.value) == f"{path}: data.heldout_books: not in the corpus: Judas{JUDAS}"
    with pytest.raises(ConfigError) as err:
        prepare(load_config("cpu.toml", overrides=["data.heldout_every=100000"]))  # no KJV chapter hashes to 0
    assert str(err.value).startswith("--set data.heldout_every=100000: data.heldout_every: the heldout split is "
                                     "empty (kjv has 31102 verses in 1189 chapters)")
    one_book = tmp_path / "one.txt"
    one_book.write_text("Jude 1:1 Jude, the servant of Jesus Christ.\nJude 1:2 Mercy unto you.\n")
    path.write_text(f'[data]\ncorpus = "{one_book}"\nheldout_books = ["Jude"]\n')
    with pytest.raises(ConfigError, match=f"^{path}: data.heldout_books: the train split is empty"):
        prepare(load_config(str(path)))


def test_token_cache_is_reused_and_keyed_by_content(kjv_corpus, tmp_path):
    cfg = load_config("cpu.toml")
    again = prepare(cfg, log=lambda *_: None)
    assert again.cache_dir == kjv_corpus.cache_dir
    assert isinstance(again.splits["train"].tokens, np.memmap)
    assert again.splits["train"].tokens.dtype == np.uint16
    # a different corpus (a text file) gets another key; so does a different split
    path = tmp_path / "small.txt"
    words = ["And", "it", "was", "so,", "for", "the", "LORD", "said", "unto", "Moses", "therefore", "but", "because"]
    path.write_text("".join(f"Genesis {c}:{v} {' '.join(words[(c * v + i) % len(words)] for i in range(9))}.\n"
                            for c in range(1, 41) for v in range(1, 6)))
    small = load_config("cpu.toml", overrides=[f'data.corpus="{path}"', "tokenizer.vocab_size=300"])
    built = []
    other = prepare(small, log=built.append)
    assert other.cache_dir != kjv_corpus.cache_dir and built
    built.clear()
    prepare(small, log=built.append)
    assert not built  # reused
    split2 = load_config("cpu.toml", overrides=[f'data.corpus="{path}"', "tokenizer.vocab_size=300",
                                                "data.heldout_every=7"])
    assert prepare(split2, log=lambda *_: None).cache_dir != other.cache_dir
    # the same corpus with another tokenizer (more merges): rebuilt; the same tokenizer again, even from a file: reused
    retrained = load_config("cpu.toml", overrides=[f'data.corpus="{path}"', "tokenizer.vocab_size=320"])
    third = prepare(retrained, log=built.append)
    assert third.cache_dir != other.cache_dir and built
    assert third.tokenizer.get_vocab_size() != other.tokenizer.get_vocab_size()
    built.clear()
    saved = tmp_path / "tokenizer.json"
    other.tokenizer.save(str(saved))
    from_file = load_config("cpu.toml", overrides=[f'data.corpus="{path}"', f'tokenizer.path="{saved}"'])
    assert prepare(from_file, log=built.append).cache_dir == other.cache_dir and not built
    changed = Tokenizer.from_file(str(saved))
    changed.add_special_tokens(["<verse>"])
    changed.save(str(saved))
    edited = prepare(from_file, log=built.append)
    assert edited.cache_dir not in (other.cache_dir, third.cache_dir) and built


def test_more_than_255_books(tmp_path):
    """Book ids are stored in the narrowest unsigned type that holds them: uint16 for 300 books."""
    path = tmp_path / "many.jsonl"
    rows = [{"book": f"Book {b}", "chapter": c, "verse": v, "text": f"And it came to pass in book {b}, so {c}."}
            for b in range(300) for c in (1, 2) for v in (1, 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = prepare(load_config("cpu.toml", overrides=[f'data.corpus="{path}"', "tokenizer.vocab_size=300",
                                                       "data.heldout_every=3"]), log=lambda *_: None)
    assert len(corpus.books) == 300
    for name in ("train", "heldout"):
        data, verses = corpus.splits[name], corpus.verses[name]
        assert data.book.dtype == np.uint16
        flags = np.flatnonzero(data.verse_start)
        assert [corpus.books[i] for i in data.book[flags]] == [v.book for v in verses]
        assert data.chapter[flags].tolist() == [v.chapter for v in verses]


def test_batches_are_a_pure_function_of_seed_step_rank(kjv_corpus):
    data = kjv_corpus.splits["train"]
    a = get_batch(data, 4, 64, seed=1, step=10)
    b = get_batch(data, 4, 64, seed=1, step=10)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.verse_start, b.verse_start)
    for other in (dict(seed=2, step=10), dict(seed=1, step=11), dict(seed=1, step=10, rank=1),
                  dict(seed=1, step=10, micro=1)):
        assert not torch.equal(get_batch(data, 4, 64, **other).x, a.x), other
    # targets are the inputs shifted by exactly one token
    starts = window_starts(len(data), 64, 4, seed=1, step=10)
    for row, s in enumerate(starts):
        window = torch.from_numpy(data.tokens[s:s + 65].astype(np.int64))
        assert torch.equal(a.x[row], window[:-1]) and torch.equal(a.y[row], window[1:])
        assert torch.equal(a.verse_start[row], torch.from_numpy(data.verse_start[s:s + 64].astype(bool)))
    assert a.x.dtype == torch.int64 and a.verse_start.dtype == torch.bool


def test_eval_windows_cover_the_split():
    starts = eval_starts(10_000, 100, 100)
    assert starts[0] == 0 and starts[-1] == 10_000 - 101 and len(starts) == 100
    with pytest.raises(ValueError, match="fewer than seq_len"):
        eval_starts(50, 100, 4)


# ----------------------------------------------------------------------------------------------------------------
# The token cache checks itself: a damaged entry is moved aside and rebuilt, with one line


def _small_corpus(tmp_path):
    path = tmp_path / "small.txt"
    words = ["And", "it", "was", "so,", "for", "the", "LORD", "said", "unto", "Moses", "therefore", "but", "because"]
    path.write_text("".join(f"Genesis {c}:{v} {' '.join(words[(c * v + i) % len(words)] for i in range(9))}.\n"
                            for c in range(1, 41) for v in range(1, 6)))
    return path


@pytest.fixture
def small(tmp_path):
    """prepare() of a 200-verse corpus with its own cache directory; and the arrays of a fresh build elsewhere."""
    corpus = _small_corpus(tmp_path)

    def run(cache_dir, log):
        cfg = load_config("cpu.toml", overrides=[f'data.corpus="{corpus}"', "tokenizer.vocab_size=300",
                                                 f'data.cache_dir="{cache_dir}"'])
        return prepare(cfg, log=log)

    fresh = run(tmp_path / "fresh", lambda *_: None)
    expected = {(name, f): np.array(getattr(fresh.splits[name], f)) for name in fresh.splits
                for f in ("tokens", "verse_start", "book", "chapter")}
    return run, expected, tmp_path / "cache"


def _same_as_fresh(corpus, expected) -> bool:
    return all(np.array_equal(getattr(corpus.splits[name], f), arr) for (name, f), arr in expected.items())


def _damage_npy_cut(cache):
    path = cache / "train.tokens.npy"
    path.write_bytes(path.read_bytes()[:-100])
    return r"train.tokens.npy is unreadable \("


def _damage_ids_same_size(cache):
    arr = np.load(cache / "train.tokens.npy")
    arr[10:20] = arr[30:40]
    np.save(cache / "train.tokens.npy", arr)
    return r"train.tokens.npy does not match its checksum in meta.json \(changed on disk\)"


def _damage_ids_past_vocab(cache):
    arr = np.load(cache / "heldout.tokens.npy")
    arr[5] = 300
    np.save(cache / "heldout.tokens.npy", arr)
    return r"heldout.tokens.npy holds ids outside the vocabulary \[0, 300\): max 300"


def _damage_meta_deleted(cache):
    (cache / "meta.json").unlink()
    return r"meta.json is missing"


def _damage_meta_cut(cache):
    meta = cache / "meta.json"
    meta.write_text(meta.read_text()[:40])
    return r"meta.json is unreadable \(JSONDecodeError"


def _damage_verse_start_length(cache):
    arr = np.load(cache / "train.verse_start.npy")
    np.save(cache / "train.verse_start.npy", arr[:-1])
    return r"train.verse_start.npy holds \(\d+,\) uint8, meta.json says \(\d+,\) uint8"


@pytest.mark.parametrize("damage", [_damage_npy_cut, _damage_ids_same_size, _damage_ids_past_vocab,
                                    _damage_meta_deleted, _damage_meta_cut, _damage_verse_start_length])
def test_a_damaged_token_cache_is_moved_aside_and_rebuilt_with_one_line(small, damage):
    run, expected, cache_dir = small
    built = run(cache_dir, lambda *_: None)
    reason = damage(built.cache_dir)
    lines = []
    again = run(cache_dir, lines.append)
    assert len(lines) == 1, lines
    assert re.fullmatch(rf"token cache {re.escape(str(built.cache_dir))}: {reason}.*; moved it aside to "
                        rf"{built.cache_dir.name}\.damaged-\S+ and rebuilding it", lines[0]), lines[0]
    assert again.cache_dir == built.cache_dir and _same_as_fresh(again, expected)
    assert len(list(built.cache_dir.parent.glob(f"{built.cache_dir.name}.damaged-*"))) == 1  # kept for inspection
    lines.clear()
    assert _same_as_fresh(run(cache_dir, lines.append), expected) and not lines  # repaired: reused, silently
    damage(built.cache_dir)  # damaged again: the newer copy replaces the older one (each is as large as the entry)
    run(cache_dir, lambda *_: None)
    assert len(list(built.cache_dir.parent.glob(f"{built.cache_dir.name}.damaged-*"))) == 1


def test_a_damaged_cached_tokenizer_is_moved_aside_and_retrained_with_one_line(small):
    run, expected, cache_dir = small
    run(cache_dir, lambda *_: None)
    (path,) = (cache_dir / "tokenizers").glob("*.json")
    good = path.read_text()
    for damaged, reason in ((good[: len(good) // 2], r"it is unreadable \(Exception: "),
                            (good.replace('"<pad>"', '"<pan>"', 1), r"it does not match its checksum")):
        path.write_text(damaged)
        lines = []
        again = run(cache_dir, lines.append)
        assert len(lines) == 1, lines
        assert re.fullmatch(rf"cached tokenizer {re.escape(str(path))}: {reason}.*; moved it aside to "
                            rf"{path.name}\.damaged-\d+ and retraining it", lines[0]), lines[0]
        assert path.read_text() == good and _same_as_fresh(again, expected)
        assert len(list(path.parent.glob(f"{path.name}.damaged-*"))) == 1  # the newest damaged copy only


def test_a_cache_entry_that_cannot_be_moved_aside_names_the_directory_to_delete(small, monkeypatch):
    from genesis import data
    from genesis.corpus import CorpusError

    run, _, cache_dir = small
    built = run(cache_dir, lambda *_: None)
    (built.cache_dir / "meta.json").unlink()

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(data.os, "replace", refuse)
    with pytest.raises(data.TokenCacheError) as err:
        run(cache_dir, lambda *_: None)
    assert isinstance(err.value, CorpusError)  # every command prints it as one line
    assert str(err.value) == (f"{built.cache_dir}: the token cache is damaged (meta.json is missing) and cannot be "
                              f"moved aside to be rebuilt (Permission denied); delete the directory {built.cache_dir} "
                              f"and run again")


def test_the_publishing_race_is_decided_by_content(small, monkeypatch):
    """Another process publishes the entry while this one builds it: a sound entry there is used, a damaged one is
    moved aside and this build published (a failed rename is not taken for a lost race)."""
    from genesis import data

    run, expected, cache_dir = small
    built = run(cache_dir, lambda *_: None)
    entry = built.cache_dir
    other = entry.with_name("other")
    shutil.copytree(entry, other)
    shutil.rmtree(entry)
    real_build = data.load_token_cache

    def rival_publishes_first(cache, vocab_size, build, building, log=print):
        def build_then_lose(tmp):
            build(tmp)
            shutil.copytree(other, cache)  # the rival's entry lands between our build and our rename
        return real_build(cache, vocab_size, build_then_lose, building, log)

    monkeypatch.setattr(data, "load_token_cache", rival_publishes_first)
    lines = []
    assert _same_as_fresh(run(cache_dir, lines.append), expected) and len(lines) == 1  # "tokenizing ..."
    (other / "meta.json").unlink()  # now the rival's entry is damaged
    shutil.rmtree(entry)
    lines = []
    assert _same_as_fresh(run(cache_dir, lines.append), expected)
    assert len(lines) == 2 and lines[1] == (f"token cache {entry}: meta.json is missing; moved it aside and publishing "
                                            f"the fresh build"), lines
    monkeypatch.undo()
    lines = []
    assert _same_as_fresh(run(cache_dir, lines.append), expected) and not lines  # our build is the one published
