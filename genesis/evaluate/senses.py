"""Connective senses: whether a lexicon word in a verse is used as a discourse connective ("conjunctive") or not.

A use is conjunctive when the word links its clause to another clause or proposition in the sense its lexicon class
names: cause, result or inference ("for he dwelt", "so he fled", "wherefore I command thee"), contrast or concession
("but", "yet", "nevertheless"), addition ("moreover") or narrative sequence ("then", "afterward"). Any other use is
"other": a preposition ("for ever", "for the sin offering", "because of the enemy"), an adverb of degree or manner
("so great", "as ... so", "thus saith"), of time ("not yet", "was then", "since the day"), an interrogative
("wherefore hast thou ...?") or "only" ("but a little").

The rule reads the verse text around the word only: the character before it (a clause boundary is the verse start or
one of , ; : . ? ! ( ) —), the word before it and the words after it up to the next punctuation mark. One function per
ambiguous word, in `RULES`; a word without one is conjunctive wherever it stands. docs/evaluation.md has the table and
the rule's precision and recall on the hand-labelled sample tests/data/connective_senses.tsv.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

BOUNDARY = ",;:.?!()—"
STRONG_BOUNDARY = ";:.?!()—"  # a clause ends here; a comma may also separate the items of a list
CLAUSE_END = ",;:.?!()—"
_TOKEN = re.compile(r"[A-Za-z’']+|[,;:.?!()—]")

# nominative pronouns and clause openers: a clause starts with them, a prepositional object never does
SUBJECTS = frozenset("i he she we they ye thou it there".split())
CLAUSE_OPENERS = frozenset(
    "if when while though although as since because lo behold thus so now then therefore who what how why whosoever "
    "whoso verily surely neither nor yet that".split())
DETERMINERS = frozenset("the a an this that these those all every my thy his her its our your their".split())
# finite verbs and auxiliaries (KJV forms); a word ending in -eth is a third-person present verb as well
FINITE = frozenset(
    "is was are were am art be wast wert hath hast have had hadst shall shalt will wilt would wouldest should "
    "shouldest could couldest can canst cannot may mayest might mightest must do doth dost did didst saith said "
    "spake came went knew saw".split())
DO_VERBS = frozenset("do did doth dost didst doeth done".split())
RELATIVES = frozenset("that which who whom whose where wherein whereby whereof".split())
# "as ... so", "according to ... so", "like as ... so": a correlative "so" or "thus" compares manners
CORRELATIVES = frozenset("as according like".split())
PAST_MARKERS = frozenset("was were wast came spake began went fell became heard left said saw".split())


@dataclass(frozen=True)
class Around:
    """What the rule may read: the word's neighbourhood in its verse."""

    prev_char: str  # the last non-space character before the word; "" at the verse start (an opening "(" counts)
    prev_word: str  # the word before it, lower case ("" when none)
    sentence_before: list[str]  # lower-case words since the last . ? ! before it
    after: list[str]  # the tokens after it up to the next clause punctuation (words as written)
    next_char: str  # the first non-space character after it ("" at the verse end)
    next_stop: str  # the first sentence-ending mark (. ? ! ; :) after it, "" when none

    @property
    def at_boundary(self) -> bool:
        return self.prev_char == "" or self.prev_char in BOUNDARY

    @property
    def at_strong_boundary(self) -> bool:
        return self.prev_char == "" or self.prev_char in STRONG_BOUNDARY

    @property
    def next_word(self) -> str:
        return self.after[0].lower() if self.after else ""

    @property
    def clause_words(self) -> list[str]:
        return [w.lower() for w in self.after]


def around(text: str, start: int, end: int) -> Around:
    before = text[:start].rstrip()
    words_before = re.findall(r"[A-Za-z’']+", before)
    sentence = re.split(r"[.?!]", before)[-1]
    rest = text[end:]
    after = []
    for token in _TOKEN.findall(rest):
        if token in CLAUSE_END:
            break
        after.append(token)
    stop = re.search(r"[.?!;:]", rest)
    return Around(prev_char=before[-1:], prev_word=words_before[-1].lower() if words_before else "",
                  sentence_before=[w.lower() for w in re.findall(r"[A-Za-z’']+", sentence)], after=after,
                  next_char=rest.lstrip()[:1], next_stop=stop.group(0) if stop else "")


def _starts_clause(a: Around) -> bool:
    """The words after begin a clause in subject-first order: a pronoun, a determiner or a proper name."""
    if not a.after:
        return False
    first = a.after[0]
    return first.lower() in SUBJECTS | DETERMINERS or (first[:1].isupper() and first.lower() not in FINITE)


def _has_finite_verb(words: list[str]) -> bool:
    for w in words:
        if w in RELATIVES:
            return False  # "for every man that is mad": the verb belongs to a relative clause
        if w in FINITE or (len(w) > 4 and w.endswith("eth")):
            return True
    return False


def rule_for(a: Around) -> bool:
    # only after a clause boundary: mid-clause "for" is a preposition ("wait for the salvation")
    if not a.at_boundary:
        return False
    if a.next_char and a.next_char in CLAUSE_END:
        return True  # "For, behold": a preposition never stands before a comma
    words = a.clause_words
    if not words or words[0] in {"ever", "evermore", "me", "him", "them", "us", "thee", "you", "himself", "herself",
                                 "itself", "themselves", "ourselves", "yourselves", "myself", "thyself", "to",
                                 "nought", "naught", "whom", "which"}:
        return False  # objects and "for to" + infinitive
    if {"sake", "sakes", "cause"} & set(words[:4]):
        return False  # "for thy sake", "for this cause": prepositional phrases
    if words[0] in SUBJECTS | CLAUSE_OPENERS:
        return True
    if a.at_strong_boundary:
        return True  # "; for the LORD hath": after ; : . or the verse start a clause is the rule
    return _has_finite_verb(words)  # after a comma, a list of "for X, for Y" has no verb of its own


def rule_because(a: Around) -> bool:
    return a.next_word != "of"  # "because of" + noun phrase is a preposition


def rule_since(a: Around) -> bool:
    # the KJV's "since" is mostly temporal: "since the day", "ever since", "since I came"; causal with a present
    # or perfect verb ("since ye seek a proof", "since I have seen thy face")
    words = a.clause_words
    if not words or a.prev_word in {"ever", "nor", "even"} or words[0] in DETERMINERS | {"then", "my", "thy"}:
        return False
    if any(w in PAST_MARKERS or (w.endswith("ed") and len(w) > 3) for w in words):
        return False
    return True


def _correlative_before(a: Around) -> bool:
    return bool(CORRELATIVES & set(a.sentence_before))


def rule_so(a: Around) -> bool:
    words = a.clause_words
    if a.next_word == "that":
        return a.prev_word not in DO_VERBS  # "so that" = with the result that; "did so that night" is not
    if a.prev_word in {"if", "even", "not", "also", "for", "do", "did", "done", "may", "hath"} or not words:
        return False  # "if so be", "even so", "for so he giveth": manner; "it was so.": a pro-form
    if not (a.at_boundary or a.prev_word == "and"):
        return False  # mid-clause: degree or manner ("so great", "so hotly pursued")
    if _correlative_before(a) or words[-1] in DO_VERBS:
        return False  # "as ye have spoken, so will I do": a comparison of manner
    if _starts_clause(a) or words[0] in {"when", "then", "after"}:
        return True  # "So he fled", "and so Abraham begat": the result or the next step
    return words[0] in FINITE  # "So shall I have wherewith to answer": inverted result; "So mightily": degree


def rule_thus(a: Around) -> bool:
    # mostly manner: "thus saith the LORD", "thus shall ye do"; a summary "Thus the heavens ... were finished" links
    if not (a.at_boundary or a.prev_word == "and"):
        return False
    words = a.clause_words
    return _starts_clause(a) and not (DO_VERBS & set(words)) and not _correlative_before(a) and words[:1] != ["and"]


def rule_but(a: Around) -> bool:
    return a.at_boundary  # mid-clause "but" means "only" or "except": "thou art but a youth", "none but thee"


def rule_yet(a: Around) -> bool:
    words = a.clause_words
    if a.prev_word in {"not", "as", "nor", "neither"}:
        return False  # "not yet", "as yet", "nor yet"
    if not (a.at_boundary or a.prev_word in {"and", "but"}):
        return False  # mid-clause: still, again, more ("there was yet a battle")
    if words[:2] in (["a", "little"], ["a", "while"]) or words[:1] in (["more"], ["again"], ["once"], ["alive"]):
        return False  # "Yet a little while": still
    return True


def rule_then(a: Around) -> bool:
    # sequence or consequence ("Then said Jesus", "if ..., then"); "at that time" after a verb of being or a
    # preposition ("the Canaanite was then in the land", "since then")
    if a.prev_word in {"was", "were", "is", "are", "am", "art", "be", "been", "being", "since", "till", "until",
                       "from", "by"}:
        return False
    # "the king then sitting in the gate"; at a boundary "Then bring" is a verb, not a participle
    return a.at_boundary or not (a.next_word.endswith("ing") and len(a.next_word) > 4)


def rule_wherefore(a: Around) -> bool:
    # "Wherefore" = therefore, unless it asks why: a question, an inverted verb after it, or an indirect question
    if a.next_stop == "?" or a.next_word in FINITE | {"then"}:
        return False
    return a.prev_word not in {"not", "know", "knew", "knoweth", "tell", "see", "shew"}


def rule_clause_start(a: Around) -> bool:
    # at the start of a clause the word links it to the one before; mid-clause "do likewise", "and likewise many"
    # mean "in the same way" / "also" inside one clause
    return a.at_boundary


def rule_however(a: Around) -> bool:
    return a.next_word not in {"much", "many", "great", "little", "long", "far"}  # "however great": degree


RULES: dict[str, Callable[[Around], bool]] = {
    "for": rule_for,
    "because": rule_because,
    "since": rule_since,
    "so": rule_so,
    "thus": rule_thus,
    "but": rule_but,
    "yet": rule_yet,
    "then": rule_then,
    "wherefore": rule_wherefore,
    "likewise": rule_clause_start,
    "accordingly": rule_clause_start,  # "according to their deeds, accordingly he will repay": manner mid-clause
    "however": rule_however,
}
# Always conjunctive (no other use in the KJV): therefore, consequently, although, moreover, furthermore,
# forasmuch ("forasmuch as" = because), insomuch ("insomuch that" = so that), lest, nevertheless, notwithstanding,
# howbeit, whereas, afterward, afterwards.


def is_conjunctive(word: str, text: str, start: int, end: int) -> bool:
    """Whether lexicon word `word`, at text[start:end] of a verse, is used as a connective (the module docstring)."""
    rule = RULES.get(word.lower())
    return True if rule is None else rule(around(text, start, end))
