"""The connective cloze as a local lm-evaluation-harness task: the items `genesis.evaluate` scores, written as a YAML
and a JSONL per item set, so that `lm_eval`'s accuracy on any transformers model is Genesis's whole-verse cloze.

    python -m genesis.evaluate --checkpoint runs/cpu --lm-eval-task runs/cpu/lm-eval-task --max-items 300

Each document is one cloze item: `context` (the verse separator and the preceding verses of the chapter, as the
cloze builds them; "" when no verse precedes), `choices` (the verse with each candidate in the slot, cased like the
original, plus its final newline) and `answer` (the index of the word that is really there). lm-eval scores each
choice by its log-likelihood given the context (`multiple_choice`, `target_delimiter: ""`); the context is the same
for every candidate, so its ranking is that of the `model_verse` scorer.

Two details of lm-eval 0.4 that this layout relies on, checked per item by `harness_tokens` (an item whose tokens
lm-eval would see differently is left out and counted):
* a context's trailing whitespace moves into the continuation, so "\\n" alone would become an empty context that
  lm-eval refuses; items with no context verse get `context: ""`, and lm-eval then conditions on `prefix_token_id`,
  which must be the verse separator's id (`--model_args ...,prefix_token_id=ID`; `lm_eval_command` prints it);
* the context is encoded alone and the continuation is what the whole text adds to it, so a context cut inside a
  verse (the model's seq_len forces the cut) must re-encode to the tokens the cloze used.
"""

from __future__ import annotations

import json
import os
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from genesis.console import note
from genesis.errors import GenesisError
from genesis.evaluate.items import VERSE_SEPARATOR, ClozeSet, candidate_texts, cased_like
from genesis.evaluate.pipeline import build_items
from genesis.evaluate.run import load_run, model_max_len

TASK_PREFIX = "genesis_cloze"
TASK_SETS = ("all", "conjunctive")  # pipeline.SETS: every item, and the slots where the word is a connective


class TaskExportError(GenesisError, ValueError):
    """A task directory that cannot be written, phrased as one line."""


def harness_tokens(tokenizer: Tokenizer, context: str, continuation: str, prefix_id: int) -> tuple[list[int], int]:
    """The tokens lm-eval 0.4's HFLM feeds a decoder-only model for (context, continuation), and the position of the
    first scored one: its `loglikelihood` (an empty context is [prefix_token_id]) and `_encode_pair` (trailing
    whitespace moves to the continuation; the continuation's tokens are the whole text's beyond the context's)."""
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    if context == "":
        return [prefix_id, *encode(continuation)], 1
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = encode(context)
    if not context_ids:
        return [], 0  # lm-eval asserts on it
    return context_ids + encode(context + continuation)[len(context_ids):], len(context_ids)


@dataclass
class TaskItems:
    """The documents of the task, item-major like the cloze set, and what was left out."""

    docs: list[dict]
    left_out: dict[str, int] = field(default_factory=dict)


def task_documents(cloze: ClozeSet, tokenizer: Tokenizer, words: list[str], texts: list[list[str]]) -> TaskItems:
    """One document per cloze item. `texts[i][k]` is item i's verse with candidate k (as `build_cloze` encodes it);
    an item is kept only if lm-eval, given the document, sees every candidate's tokens exactly as the cloze scores
    them and scores at least the verse (`harness_tokens`)."""
    separator = tokenizer.encode(VERSE_SEPARATOR, add_special_tokens=False).ids
    if len(separator) != 1:
        raise TaskExportError(f"the verse separator {VERSE_SEPARATOR!r} is {len(separator)} tokens in the run's "
                              "tokenizer; lm-eval's prefix_token_id takes one")
    K = cloze.n_candidates
    docs, left_out = [], Counter()
    for i, slot in enumerate(cloze.items):
        first = i * K
        context_ids = cloze.tokens[first][: cloze.verse_start[first]].tolist()
        # the separator that opens every cloze sequence is lm-eval's prefix token when no verse precedes
        context = "" if context_ids == separator else tokenizer.decode(context_ids, skip_special_tokens=False)
        ok = True
        for k in range(K):
            seq = first + k
            ids, scored_from = harness_tokens(tokenizer, context, texts[i][k], separator[0])
            if ids != cloze.tokens[seq].tolist() or not 0 < scored_from <= cloze.verse_start[seq]:
                ok = False
                break
        if not ok:
            left_out["tokens_differ_in_lm_eval"] += 1
            continue
        docs.append({"id": slot.item_id, "context": context, "choices": texts[i], "answer": int(cloze.answer[i]),
                     "word": words[int(cloze.answer[i])], "conjunctive": bool(slot.conjunctive),
                     "verse_initial": bool(slot.verse_initial)})
    return TaskItems(docs, dict(left_out))


def task_yaml(name: str, data_file: Path) -> str:
    """A local lm-eval task over one JSONL file (a `datasets` json dataset, its only split "test")."""
    return "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file))}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: context",
        "doc_to_choice: choices",
        "doc_to_target: answer",
        'target_delimiter: ""',
        "num_fewshot: 0",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        "",
    ])


def write_task(out_dir: str | os.PathLike, items: TaskItems) -> list[Path]:
    """genesis_cloze_<set>.yaml and .jsonl for each of `TASK_SETS`; the YAMLs name their JSONL by absolute path."""
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise TaskExportError(f"{out_dir}: not a directory")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in TASK_SETS:
        docs = [d for d in items.docs if name == "all" or d[name]]
        task = f"{TASK_PREFIX}_{name}"
        data = out / f"{task}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (out / f"{task}.yaml").write_text(task_yaml(task, data))
        written += [out / f"{task}.yaml", data]
    return written


def lm_eval_command(model_dir: str, task_dir: str | os.PathLike, prefix_id: int) -> str:
    """The `lm_eval` command that runs both tasks on a transformers model directory."""
    tasks = ",".join(f"{TASK_PREFIX}_{name}" for name in TASK_SETS)
    args = f"pretrained={model_dir},dtype=float32,prefix_token_id={prefix_id}"
    return (f"lm_eval --model hf --model_args {shlex.quote(args)} --include_path {shlex.quote(str(task_dir))} "
            f"--tasks {tasks} --batch_size 16")


def export_task(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, corpus: str | None = None,
                split: str = "heldout", max_items: int = 0, context_verses: int = 0, say=note) -> dict:
    """Writes the task for a run's items (the same `build_items` call as `genesis.evaluate`'s) and returns what it
    wrote: the files, the item counts, what was left out, the prefix token id and the `lm_eval` command."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():  # before the run is loaded and its items built
        raise TaskExportError(f"{out_dir}: not a directory")
    run = load_run(checkpoint, "cpu")
    max_len = model_max_len(run.model)
    items = build_items(run.cfg, run.tokenizer, max_len, corpus or run.cfg.data.corpus, split, max_items,
                        context_verses, say)
    cloze, lex = items.cloze, items.lex
    words = [lex.words[c] for c in cloze.candidates]
    texts = [candidate_texts(items.eval_split.verses[s.verse_index].text, s,
                             [cased_like(items.eval_split.verses[s.verse_index].text[s.char_start:s.char_end], w)
                              for w in words])
             for s in cloze.items]
    task = task_documents(cloze, run.tokenizer, words, texts)
    if not task.docs:
        raise TaskExportError(f"no cloze item keeps its tokens in lm-eval ({task.left_out})")
    files = write_task(out_dir, task)
    prefix_id = run.tokenizer.encode(VERSE_SEPARATOR, add_special_tokens=False).ids[0]
    model_dir = f"{run.checkpoint.parent}-hf"  # where the README's export example puts a run's transformers copy
    info = {
        "checkpoint": str(run.checkpoint), "step": run.step, "corpus": corpus or run.cfg.data.corpus, "split": split,
        "max_items": max_items, "context_verses": context_verses, "seq_len": max_len,
        "n_items": {name: sum(1 for d in task.docs if name == "all" or d[name]) for name in TASK_SETS},
        "skipped": cloze.skipped, "left_out": task.left_out, "prefix_token_id": prefix_id,
        "model_dir": model_dir, "command": lm_eval_command(model_dir, Path(out_dir), prefix_id),
        "files": [str(f) for f in files],
    }
    (Path(out_dir) / f"{TASK_PREFIX}.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
