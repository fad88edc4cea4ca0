"""The seed design notes' (dynamic_masking_implementation_guide.md) per-sample baselines: the Strategy 1/2/3
Datasets with `__getitem__` as written there, and the probability their rules give each position, computed
independently of `__getitem__` (what the loop provider's rate check compares the masking with).

Two fixes so the cost is faithful and the rates checkable: real punctuation ids instead of `token_id < 100`, and the
token cache's verse_start flags for "verse-initial". Each Dataset is indexed by window start instead of
idx * max_seq_len, so that a sampler can hand it the same windows as the other providers.
"""

from __future__ import annotations

import random

import numpy as np
import torch


class NotesUniformDataset(torch.utils.data.Dataset):
    """Strategy 1 (uniform random masking of connectives), `__getitem__` as in the notes. Indexed by window start
    instead of idx * max_seq_len, so that a sampler can hand it the same windows as the other providers."""

    def __init__(self, tokens: list[int], tokenizer, max_seq_len: int, mask_prob: float = 0.3):
        self.max_seq_len, self.mask_prob = max_seq_len, mask_prob
        self.connective_words = ["therefore", "because", "so", "thus", "for", "but", "however", "yet", "although",
                                 "since", "moreover", "furthermore", "consequently"]
        self.connective_ids = set()
        for word in self.connective_words:
            for variant in (word.lower(), word.capitalize()):
                token_id = tokenizer.token_to_id(variant)
                if token_id is not None:
                    self.connective_ids.add(token_id)
        self.tokens = tokens  # the notes: tokenizer.encode(text).ids, a Python list
        self.mask_token_id = tokenizer.token_to_id("[MASK]") or 0

    def __len__(self):
        return len(self.tokens) - self.max_seq_len

    def __getitem__(self, start_idx):
        end_idx = start_idx + self.max_seq_len
        x = self.tokens[start_idx:end_idx].copy()
        y = self.tokens[start_idx + 1 : end_idx + 1].copy()
        for i in range(len(x)):
            if x[i] in self.connective_ids and random.random() < self.mask_prob:
                x[i] = self.mask_token_id
        return torch.tensor(x, dtype=torch.long), torch.tensor(y, dtype=torch.long)

    def prob_by_id(self, vocab_size: int) -> np.ndarray:
        p = np.zeros(vocab_size)
        p[list(self.connective_ids)] = self.mask_prob
        return p


class NotesWeightedDataset(torch.utils.data.Dataset):
    """Strategy 2 (weighted by difficulty), `__getitem__` as in the notes (tokens kept as a numpy array, as there)."""

    CONNECTIVE_WEIGHTS = {
        "therefore": 1.0, "Thus": 0.95, "consequently": 0.9, "accordingly": 0.9,
        "because": 0.7, "for": 0.6, "since": 0.65, "so": 0.5,
        "but": 0.3, "however": 0.35, "yet": 0.3, "moreover": 0.4, "furthermore": 0.4, "although": 0.45,
    }

    def __init__(self, tokens: list[int], tokenizer, max_seq_len: int, base_prob: float = 0.4):
        self.max_seq_len, self.base_prob = max_seq_len, base_prob
        self.token_weights = {}
        for word, weight in self.CONNECTIVE_WEIGHTS.items():
            for variant in (word.lower(), word.capitalize(), word.upper()):
                token_id = tokenizer.token_to_id(variant)
                if token_id is not None:
                    self.token_weights[token_id] = weight
        self.tokens = np.array(tokens)  # the notes: np.array(tokenizer.encode(text).ids), int64
        self.mask_token_id = tokenizer.token_to_id("[MASK]") or 0

    def __len__(self):
        return len(self.tokens) - self.max_seq_len

    def __getitem__(self, start_idx):
        end_idx = start_idx + self.max_seq_len
        x = self.tokens[start_idx:end_idx].copy()
        y = self.tokens[start_idx + 1 : end_idx + 1].copy()
        for i in range(len(x)):
            if x[i] in self.token_weights:
                weight = self.token_weights[x[i]]
                mask_prob = self.base_prob * weight
                if random.random() < mask_prob:
                    x[i] = self.mask_token_id
        return torch.tensor(x, dtype=torch.long), torch.tensor(y, dtype=torch.long)

    def prob_by_id(self, vocab_size: int) -> np.ndarray:
        p = np.zeros(vocab_size)
        for token_id, weight in self.token_weights.items():
            p[token_id] = self.base_prob * weight
        return p


class NotesStructuralDataset(torch.utils.data.Dataset):
    """Strategy 3 (structural position), `__getitem__` and `_get_clause_length` as in the notes, with real
    punctuation ids (tokens holding one of .,;:?!) and the token cache's verse-start positions."""

    def __init__(self, tokens: list[int], verse_start: np.ndarray, tokenizer, max_seq_len: int,
                 punctuation_ids: set[int]):
        self.max_seq_len = max_seq_len
        self.connective_ids = self._build_connective_set(tokenizer)
        self.tokens = tokens  # the notes: a Python list
        self.verse_token_positions = set(np.flatnonzero(verse_start).tolist())  # notes: a set of token positions
        self.punctuation_ids = punctuation_ids
        self.mask_token_id = tokenizer.token_to_id("[MASK]") or 0

    def _build_connective_set(self, tokenizer):
        words = ["therefore", "because", "so", "thus", "for", "but", "however", "yet", "moreover", "furthermore"]
        ids = set()
        for word in words:
            for variant in (word.lower(), word.capitalize()):
                tid = tokenizer.token_to_id(variant)
                if tid:
                    ids.add(tid)
        return ids

    def __len__(self):
        return len(self.tokens) - self.max_seq_len

    def __getitem__(self, start_idx):
        end_idx = start_idx + self.max_seq_len
        x = self.tokens[start_idx:end_idx].copy()
        y = self.tokens[start_idx + 1 : end_idx + 1].copy()
        for i in range(len(x)):
            if x[i] in self.connective_ids:
                abs_pos = start_idx + i
                is_verse_initial = abs_pos in self.verse_token_positions
                clause_length = self._get_clause_length(x, i)
                if is_verse_initial and clause_length > 10:
                    mask_prob = 0.8
                elif is_verse_initial:
                    mask_prob = 0.6
                elif clause_length > 15:
                    mask_prob = 0.5
                else:
                    mask_prob = 0.3
                if random.random() < mask_prob:
                    x[i] = self.mask_token_id
        return torch.tensor(x, dtype=torch.long), torch.tensor(y, dtype=torch.long)

    def _get_clause_length(self, tokens, position):
        length = 0
        for j in range(position - 1, max(0, position - 30), -1):
            length += 1
            if tokens[j] in self.punctuation_ids:  # the notes: `tokens[j] < 100`, a guess
                break
        return length

    def prob_by_id(self, vocab_size: int) -> np.ndarray:
        p = np.zeros(vocab_size)
        p[list(self.connective_ids)] = 1.0  # marks connectives; the rules give the probability
        return p


def notes_expected_probs(ds, x: np.ndarray, vs: np.ndarray, vocab_size: int) -> np.ndarray:
    """(B, T) probability the notes' rules give each position, computed independently of `__getitem__`: vectorised,
    with the clause length in closed form (the notes' scan visits positions position-1 down to lo+1, lo =
    max(0, position-30), and stops on punctuation: length = position - last punctuation there, else the number of
    positions visited)."""
    prob = ds.prob_by_id(vocab_size)[x]
    if not isinstance(ds, NotesStructuralDataset):
        return prob
    B, T = x.shape
    pos = np.arange(T)
    punct = np.isin(x, np.fromiter(ds.punctuation_ids, dtype=np.int64))
    last = np.maximum.accumulate(np.where(punct, pos, -1), axis=1)  # last punctuation at or before each position
    before = np.concatenate([np.full((B, 1), -1), last[:, :-1]], axis=1)  # ... strictly before
    lo = np.maximum(0, pos - 30)
    clause = np.where(before > lo, pos - before, np.maximum(0, pos - 1 - lo))
    verse_initial = vs.astype(bool)
    rule = np.select([verse_initial & (clause > 10), verse_initial, clause > 15], [0.8, 0.6, 0.5], 0.3)
    return np.where(prob > 0, rule, 0.0)


def notes_dataset(strategy: str, tokens: list[int], verse_start: np.ndarray, tokenizer, seq_len: int,
                  punctuation_ids: set[int]) -> torch.utils.data.Dataset:
    """The notes' Dataset of `strategy` over `tokens` (a Python list, as the notes hold their corpus)."""
    if strategy == "uniform":
        return NotesUniformDataset(tokens, tokenizer, seq_len)
    if strategy == "weighted":
        return NotesWeightedDataset(tokens, tokenizer, seq_len)
    return NotesStructuralDataset(tokens, verse_start, tokenizer, seq_len, punctuation_ids)
