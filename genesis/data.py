"""Data: held-out split by whole chapters, a memory-mapped token cache, and batches keyed by (seed, step, rank).

The corpus is tokenized once per (corpus, split, tokenizer, format) into flat arrays per split:
`tokens` (uint16 when the vocabulary fits), `verse_start` (1 on the first token of each verse, found from the
tokenizer's character offsets), `book` and `chapter` ids. Verses are joined with "\\n", so the newline token is
the verse separator. Batches are random windows of T+1 tokens: inputs are the first T, targets the last T (the one
and only shift), and each batch is a pure function of (seed, step, micro-step, rank): a resumed run sees the same
batches.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import json
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from genesis.config import Config, ConfigError, DataConfig, cache_root
from genesis.corpus import CorpusError, Verse, corpus_hash, load_corpus
from genesis.errors import InputError, as_disk_full, write_failure
from genesis.tokenizer import TokenizerError, get_tokenizer, tokenizer_hash

CACHE_FORMAT = "tokens-v2"  # bump when the cache layout or the text joining changes (v2: checksums)
SPLITS = ("train", "heldout")


def is_heldout(book: str, chapter: int, cfg: DataConfig) -> bool:
    """1 chapter in `heldout_every`, by a stable hash of (book, chapter), plus whole `heldout_books`.

    A hash rather than a running index keeps the same chapters held out in every translation (KJV and ASV) even
    if one of them lacks a chapter."""
    if book in cfg.heldout_books:
        return True
    return zlib.crc32(f"{book}|{chapter}".encode()) % cfg.heldout_every == 0


def split_verses(verses: list[Verse], cfg: DataConfig, origin_of=None) -> dict[str, list[Verse]]:
    """Verses by split. `origin_of(dotted_key)` names where a key's value came from (the config file or the
    `--set`), for the error message; without it the message starts at the key."""
    from genesis.config import ConfigError

    def fail(key: str, reason: str):
        where = origin_of(key) if origin_of is not None else ""
        raise ConfigError(f"{where + ': ' if where else ''}{key}: {reason}")

    out: dict[str, list[Verse]] = {s: [] for s in SPLITS}
    for v in verses:
        out["heldout" if is_heldout(v.book, v.chapter, cfg) else "train"].append(v)
    books = list(dict.fromkeys(v.book for v in verses))
    unknown = sorted(set(cfg.heldout_books) - set(books))
    if unknown:
        named = []
        for book in unknown:  # the KJV's "Revelation of John", not "Revelation": suggest the corpus's spelling
            close = [repr(b) for b in difflib.get_close_matches(book, books)]
            options = ", ".join(close[:-1]) + " or " + close[-1] if len(close) > 1 else "".join(close)
            named.append(book + (f" (did you mean {options}?)" if close else ""))
        fail("data.heldout_books", f"not in the corpus: {', '.join(named)}")
    if not out["train"] or not out["heldout"]:
        chapters = len({(v.book, v.chapter) for v in verses})
        counts = f"{cfg.corpus} has {len(verses)} verses in {chapters} chapters"
        if not out["train"]:
            key = "data.heldout_books" if cfg.heldout_books else "data.heldout_every"
            fail(key, f"the train split is empty ({counts}); hold out fewer books or chapters")
        fail("data.heldout_every", f"the heldout split is empty ({counts}); lower heldout_every "
                                   f"(now {cfg.heldout_every}) or name data.heldout_books")
    return out


def _chapters(verses: list[Verse]) -> list[list[Verse]]:
    """Consecutive verses of the same chapter, in corpus order (the unit of encoding)."""
    groups: list[list[Verse]] = []
    for v in verses:
        if groups and (groups[-1][0].book, groups[-1][0].chapter) == (v.book, v.chapter):
            groups[-1].append(v)
        else:
            groups.append([v])
    return groups


def tokenize_verses(verses: list[Verse], tokenizer: Tokenizer, books: list[str]) -> dict[str, np.ndarray]:
    """Flat token ids with aligned per-token `verse_start`, `book` and `chapter` arrays.

    Each chapter is encoded as one string, its verses each followed by "\\n". The first token of a verse is the
    first token whose character span ends after the verse's first character: exact for any tokenizer, including
    ones whose tokens carry a leading space or merge across the separator."""
    groups = _chapters(verses)
    texts, verse_offsets = [], []
    for g in groups:
        starts, pos = [], 0
        for v in g:
            starts.append(pos)
            pos += len(v.text) + 1
        texts.append("".join(v.text + "\n" for v in g))
        verse_offsets.append(np.array(starts, dtype=np.int64))
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    ids, vstart, book, chapter = [], [], [], []
    book_index = {b: i for i, b in enumerate(books)}
    # uint8 / uint16 for a Bible (66 books, 150 chapters at most); wider only for corpora that need it
    book_dtype = _smallest_uint(len(books) - 1)
    chapter_dtype = _smallest_uint(max((g[0].chapter for g in groups), default=0), np.uint16)
    for g, enc, starts in zip(groups, encodings, verse_offsets):
        n = len(enc.ids)
        ends = np.fromiter((e for _, e in enc.offsets), dtype=np.int64, count=n)
        flags = np.zeros(n, dtype=np.uint8)
        first = np.searchsorted(ends, starts, side="right")  # first token with end > verse start
        flags[first[first < n]] = 1
        ids.append(np.asarray(enc.ids, dtype=np.int64))
        vstart.append(flags)
        book.append(np.full(n, book_index[g[0].book], dtype=book_dtype))
        chapter.append(np.full(n, g[0].chapter, dtype=chapter_dtype))
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    return {
        "tokens": np.concatenate(ids).astype(dtype),
        "verse_start": np.concatenate(vstart),
        "book": np.concatenate(book),
        "chapter": np.concatenate(chapter),
    }


def _smallest_uint(largest: int, smallest=np.uint8):
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if np.dtype(dtype).itemsize >= np.dtype(smallest).itemsize and largest <= np.iinfo(dtype).max:
            return dtype
    raise InputError(f"{largest} does not fit an unsigned 64-bit integer")


@dataclass
class TokenSplit:
    """One split's memory-mapped arrays."""

    tokens: np.ndarray
    verse_start: np.ndarray
    book: np.ndarray
    chapter: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Corpus:
    """Everything the trainer and the evaluator need from the data side."""

    verses: dict[str, list[Verse]]
    tokenizer: Tokenizer
    splits: dict[str, TokenSplit]
    books: list[str]
    cache_dir: Path


def _cache_key(corpus_digest: str, tok: Tokenizer, cfg: DataConfig) -> str:
    parts = [CACHE_FORMAT, corpus_digest, tokenizer_hash(tok), str(cfg.heldout_every), ",".join(cfg.heldout_books)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def prepare(cfg: Config, log=print) -> Corpus:
    """Load the corpus, split it, get the tokenizer and the token cache (built once, checked on every load, then
    memory-mapped)."""
    verses = load_corpus(cfg.data.corpus, cfg.data.format, cfg.data.reference_pattern, cfg.data.lines_per_chapter)
    split = split_verses(verses, cfg.data, cfg.origin_of)
    books = list(dict.fromkeys(v.book for v in verses))
    root = cache_root(cfg.data)
    train_digest = corpus_hash(split["train"])
    try:
        tok = get_tokenizer(cfg.tokenizer, [v.text + "\n" for v in split["train"]], train_digest, root, log=log)
    except TokenizerError as e:  # no such mask token: name where the setting came from
        key = "tokenizer.mask_token" if cfg.tokenizer.mask_token else "tokenizer.path"
        if not cfg.tokenizer.mask_token and not cfg.tokenizer.path:
            raise
        raise ConfigError(f"{cfg.origin_of(key)}: {key}: {e}") from None
    key = _cache_key(corpus_hash(verses), tok, cfg.data)

    def build(tmp: Path) -> None:
        meta = {"format": CACHE_FORMAT, "books": books, "corpus": cfg.data.corpus, "splits": {}, "arrays": {}}
        for name in SPLITS:
            arrays = tokenize_verses(split[name], tok, books)
            for field_name, arr in arrays.items():
                path = tmp / f"{name}.{field_name}.npy"
                np.save(path, arr)
                meta["arrays"][f"{name}.{field_name}"] = {"length": int(len(arr)), "dtype": str(arr.dtype),
                                                          "sha256": file_digest(path)}
            meta["splits"][name] = {"tokens": int(len(arrays["tokens"])), "verses": len(split[name])}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    cache = root / "tokens" / key
    splits = load_token_cache(cache, tok.get_vocab_size(with_added_tokens=True), build,
                              f"tokenizing {len(verses):,} verses into {cache}", log)
    return Corpus(verses=split, tokenizer=tok, splits=splits, books=books, cache_dir=cache)


# ----------------------------------------------------------------------------------------------------------------
# The token cache: one directory per key, published by an atomic rename, checked against its meta.json on every load


class TokenCacheError(CorpusError):
    """A token cache entry that is damaged and cannot be rebuilt: one line naming the directory to delete. A
    CorpusError, so that every command prints it as one line."""


class _Damaged(Exception):
    """Why a cache entry cannot be used (one line)."""


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (hardware-accelerated on most CPUs, which is why it is sha256)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_token_cache(cache: Path, vocab_size: int) -> dict[str, TokenSplit]:
    """The entry's memory-mapped splits, every array checked against meta.json (length, dtype, sha256 of the
    file) and the token ids against the vocabulary; `_Damaged` with the first problem found."""
    try:
        meta = json.loads((cache / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _Damaged("meta.json is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Damaged(f"meta.json is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
            from None
    records = meta.get("arrays") if isinstance(meta, dict) and meta.get("format") == CACHE_FORMAT else None
    if not isinstance(records, dict):
        raise _Damaged(f"meta.json is not a {CACHE_FORMAT} record")
    splits = {}
    for name in SPLITS:
        arrays = {}
        for field_name in TokenSplit.__annotations__:
            array_name = f"{name}.{field_name}"
            path = cache / f"{array_name}.npy"
            want = records.get(array_name)
            if not isinstance(want, dict) or not {"length", "dtype", "sha256"} <= set(want):
                raise _Damaged(f"meta.json has no record of {path.name}")
            try:
                arr = np.load(path, mmap_mode="r")
            except FileNotFoundError:
                raise _Damaged(f"{path.name} is missing") from None
            except (OSError, ValueError, EOFError) as e:  # a file cut short, a damaged header
                raise _Damaged(f"{path.name} is unreadable ({str(e).splitlines()[0] if str(e) else 'cut short?'})") \
                    from None
            if arr.ndim != 1 or len(arr) != want["length"] or str(arr.dtype) != want["dtype"]:
                raise _Damaged(f"{path.name} holds {arr.shape} {arr.dtype}, meta.json says ({want['length']},) "
                               f"{want['dtype']}")
            if arrays and len(arr) != len(arrays["tokens"]):
                raise _Damaged(f"{path.name} is not aligned with {name}.tokens.npy")
            largest = int(arr.max()) if field_name == "tokens" and len(arr) else -1
            if largest >= vocab_size:
                raise _Damaged(f"{path.name} holds ids outside the vocabulary [0, {vocab_size}): max {largest}")
            if file_digest(path) != want["sha256"]:
                raise _Damaged(f"{path.name} does not match its checksum in meta.json (changed on disk)")
            arrays[field_name] = arr
        splits[name] = TokenSplit(**arrays)
    return splits


def _move_aside(cache: Path, reason: str) -> Path:
    """Rename a damaged entry out of the way, kept for inspection until the next damaged copy replaces it (at most
    one per entry: each is as large as the entry); gone already (another process moved it): fine."""
    for older in cache.parent.glob(f"{glob.escape(cache.name)}.damaged-*"):
        shutil.rmtree(older, ignore_errors=True)
    aside = cache.with_name(f"{cache.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    try:
        os.replace(cache, aside)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise TokenCacheError(f"{cache}: the token cache is damaged ({reason}) and cannot be moved aside to be rebuilt "
                              f"({e.strerror or e}); delete the directory {cache} and run again") from None
    return aside


def load_token_cache(cache: Path, vocab_size: int, build, building: str, log=print) -> dict[str, TokenSplit]:
    """The entry at `cache`, checked (`check_token_cache`); built by `build(tmp_dir)` when missing, and moved aside
    and rebuilt (one log line) when damaged. `building` is the log line of a fresh build.

    Entries are published by renaming a complete temporary directory onto `cache`. When that rename fails, the
    entry there decides: another process's valid entry is used (the same content: the key is a hash of the
    inputs), a damaged one is moved aside and the rename tried again."""
    if cache.exists():
        try:
            return check_token_cache(cache, vocab_size)
        except _Damaged as e:
            aside = _move_aside(cache, str(e))
            building = f"token cache {cache}: {e}; moved it aside to {aside.name} and rebuilding it"
    log(building)
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        try:
            build(tmp)
        except OSError as e:
            reason = write_failure(as_disk_full(e, tmp), tmp)  # while the partial build still fills the disk
            raise TokenCacheError(f"{cache}: cannot build the token cache ({reason}); the partial build is removed") \
                from None
        for _ in range(3):
            try:
                os.replace(tmp, cache)  # atomic: a half-written entry is never visible
                break
            except OSError:
                if not cache.exists():
                    raise
            try:  # another process published first: its entry, if sound, is the same as ours
                return check_token_cache(cache, vocab_size)
            except _Damaged as e:
                _move_aside(cache, str(e))
                log(f"token cache {cache}: {e}; moved it aside and publishing the fresh build")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        return check_token_cache(cache, vocab_size)
    except _Damaged as e:
        raise TokenCacheError(f"{cache}: the token cache fails its check right after being rebuilt ({e}); delete the "
                              f"directory {cache} and run again") from None


# ----------------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) int64 inputs
    y: torch.Tensor  # (B, T) int64 next-token targets
    verse_start: torch.Tensor  # (B, T) bool, aligned with x


def window_starts(n_tokens: int, seq_len: int, batch_size: int, seed: int, step: int, rank: int = 0,
                  micro: int = 0) -> np.ndarray:
    """Window starts for one micro-batch: a pure function of (seed, step, rank, micro-step)."""
    if n_tokens < seq_len + 1:
        raise InputError(f"split has {n_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, rank, micro, 0x6E5])))
    return rng.integers(0, n_tokens - seq_len, size=batch_size)


def gather_windows(data: TokenSplit, starts: np.ndarray, seq_len: int, device: torch.device | str = "cpu") -> Batch:
    """(B, T+1) windows at `starts`, split into inputs and targets, moved to `device` (pinned, non-blocking)."""
    idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(seq_len + 1)
    tokens = torch.from_numpy(data.tokens[idx].astype(np.int64))
    vstart = torch.from_numpy(data.verse_start[idx[:, :-1]].astype(np.bool_))
    device = torch.device(device)
    if device.type == "cuda":
        tokens = tokens.pin_memory().to(device, non_blocking=True)
        vstart = vstart.pin_memory().to(device, non_blocking=True)
    return Batch(x=tokens[:, :-1], y=tokens[:, 1:], verse_start=vstart)


def get_batch(data: TokenSplit, batch_size: int, seq_len: int, seed: int, step: int, rank: int = 0, micro: int = 0,
              device: torch.device | str = "cpu") -> Batch:
    return gather_windows(data, window_starts(len(data), seq_len, batch_size, seed, step, rank, micro), seq_len, device)


def eval_starts(n_tokens: int, seq_len: int, n_windows: int) -> np.ndarray:
    """Evenly spaced windows over a split (deterministic; covers it when n_windows * seq_len >= n_tokens)."""
    last = n_tokens - seq_len - 1
    if last < 0:
        raise InputError(f"split has {n_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    return np.unique(np.linspace(0, last, num=n_windows).round().astype(np.int64))
