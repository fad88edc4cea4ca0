"""Connective evaluation of a trained run, by stage: `items` (slots and cloze sets), `senses` (whether a slot is a
connective use of its word), `scorers` (next-token, class head, cloze, the n-gram baseline), `link_metric` (the link
head and the frozen probe), `pipeline` (context, scoring, breakdowns), `report` (tables, JSON, plots), `lm_eval_task`
(the cloze as an lm-evaluation-harness task); `run` loads the run and `cli` is `python -m genesis.evaluate`.

Items. A connective slot is a whole-word occurrence of a lexicon word (the run's [masking] lexicon) in a verse of the
split, found by `genesis.lexicon.find_matches`, the same oracle the masker is tested against. Verses are encoded one
by one as text + "\\n" and concatenated; for byte-level BPE that is exactly the training token stream. Each slot
carries: verse-initial (its first token is the verse's first token), clause length (`genesis.masking.clause_length`
in the run's masking.clause_length mode, on the split's token stream: with the default "preceding", the tokens of the
clause before the connective — for a verse-initial one, the last clause of the previous verse), book and genre
(`genre_of`), and whether the word is used as a discourse connective there (`conjunctive`, by the rule in `senses`).
Every metric below is given on all the items and on the conjunctive ones (`pipeline.SETS`).

Metrics.
* Next-token accuracy: the split's token stream is read in windows of the model's seq_len (`pack_windows`), each
  slot with at least seq_len / 2 tokens of preceding context (fewer only at the start of the stream; a slot at
  stream position 0 has none and is skipped). A word of k pieces counts as correct only if all k pieces are the argmax,
  teacher-forced (piece j is predicted after the true pieces 0..j-1). Ties are split, not broken: a piece whose
  true token shares the maximal logit with m - 1 others earns 1/m, and a word earns the product over its pieces,
  i.e. the expected accuracy of a random tie-break. `first_piece_accuracy` scores piece 0 alone.
* Cloze ranking: for each slot every lexicon word is put in its place, in the form the position needs (the
  original's casing: lower, Capitalised or UPPER; the text around it unchanged, so a leading space or none comes
  with it) and re-tokenized, so every candidate has all its pieces. Each candidate sequence is
  [verse separator] + [up to --context-verses preceding verses of the chapter] + [the verse with the candidate] + "\\n";
  the context is conditioning only. Two scores: `verse` = log-likelihood of the verse's tokens (the whole verse,
  candidate pieces and final newline included); `suffix` = log-likelihood of the tokens after the candidate only,
  conditioned on everything before (the lm-evaluation-harness partial scoring used for Winogrande). The prediction is
  the argmax; candidates within 1e-6 nats of the best share the credit (1/m each), and the confusion matrix spreads
  the same shares, so its rows sum to the item counts.
* Baselines on the same cloze items: `majority` (the connective most frequent in the run's training split),
  `positional_majority` (the most frequent one among verse-initial, resp. inside, training occurrences) and
  `kn3_verse` / `kn3_suffix`: an interpolated Kneser-Ney token trigram (discount n1 / (n1 + 2 n2) per order, the
  unigram level interpolated with the uniform distribution) trained on the run's training split tokenized with the
  run's tokenizer, scored by the same cloze procedure on the same candidate sequences.
* The link metric (`link_metric`): each cloze item's answer sequence with its connective masked, read at the
  masker's readout position (`genesis.masking.readout_position`), ranked by the run's link head (`link_head`, runs
  with one) and by a frozen linear probe fitted on training occurrences built the same way (`link_probe`, every
  model with hidden states).

The result records the run's identity (`run_identity`: the step and a SHA-256 of the weights, model args, config and
tokenizer), so a saved eval.json can be matched to the checkpoint it measured (the comparison runner re-evaluates
when they differ).

Cross-translation: `--corpus asv` evaluates the same held-out chapters (the split hashes book and chapter) in the
ASV's wording, tokenized with the run's tokenizer; the baselines are still trained on the run's own training split.
"""

from genesis.evaluate.cli import main, parse_args
from genesis.evaluate.items import (
    CLAUSE_BUCKETS,
    CLAUSE_LABELS,
    POSITIONS,
    VERSE_SEPARATOR,
    ClozeSet,
    EncodedSplit,
    Slot,
    build_cloze,
    cased_like,
    clause_bucket,
    encode_split,
    find_slots,
    select_evenly,
)
from genesis.evaluate.link_metric import (
    LINK_SCORERS,
    PROBE_L2,
    PROBE_MAX_TRAIN,
    PROBE_READOUT,
    LinkItems,
    Probe,
    fit_probe,
    heldout_link_items,
    read_features,
    score_link,
    train_link_items,
)
from genesis.evaluate.pipeline import (
    BREAKDOWNS,
    SETS,
    ClozeItems,
    EvalContext,
    build_context,
    build_items,
    class_head_result,
    evaluate_checkpoint,
    evaluate_model,
    load_split_verses,
    masked_context_result,
    set_masks,
    summarize,
)
from genesis.evaluate.report import format_class_head, format_tables, in_set, result_sets, write_json, write_plots
from genesis.evaluate.run import (
    EvalError,
    Run,
    checkpoint_identity,
    config_from_dict,
    load_run,
    model_max_len,
    resolve_device,
    run_connectives,
    run_identity,
)
from genesis.evaluate.scorers import (
    CLOZE_SCORERS,
    DEFAULT_BATCH_TOKENS,
    DEFAULT_CONTEXT_K,
    LOGIT_PATHS,
    TIE_TOLERANCE,
    ClassHeadScores,
    ClozeScores,
    KneserNeyTrigram,
    MaskedContextScores,
    NextTokenScores,
    constant_shares,
    logits_at,
    masked_stream,
    pack_windows,
    prediction_shares,
    score_class_head,
    score_cloze_model,
    score_cloze_ngram,
    score_masked_context,
    score_next_token,
    token_logprobs,
)
from genesis.evaluate.senses import RULES, is_conjunctive

__all__ = [
    "BREAKDOWNS", "CLAUSE_BUCKETS", "CLAUSE_LABELS", "CLOZE_SCORERS", "ClassHeadScores", "ClozeItems", "ClozeScores",
    "ClozeSet", "DEFAULT_BATCH_TOKENS", "DEFAULT_CONTEXT_K", "EncodedSplit", "EvalContext", "EvalError",
    "KneserNeyTrigram", "LINK_SCORERS", "LOGIT_PATHS", "LinkItems", "MaskedContextScores", "NextTokenScores",
    "POSITIONS", "PROBE_L2", "PROBE_MAX_TRAIN", "PROBE_READOUT", "Probe", "RULES", "Run", "SETS", "Slot",
    "TIE_TOLERANCE", "VERSE_SEPARATOR", "build_cloze", "build_context", "build_items", "cased_like",
    "checkpoint_identity", "class_head_result", "clause_bucket", "config_from_dict", "constant_shares", "encode_split",
    "evaluate_checkpoint", "evaluate_model", "find_slots", "fit_probe", "format_class_head", "format_tables",
    "heldout_link_items", "in_set", "is_conjunctive", "load_run", "load_split_verses", "logits_at", "main",
    "masked_context_result", "masked_stream", "model_max_len", "pack_windows", "parse_args", "prediction_shares",
    "read_features", "resolve_device", "result_sets", "run_connectives", "run_identity", "score_class_head",
    "score_cloze_model", "score_cloze_ngram", "score_link", "score_masked_context", "score_next_token", "select_evenly",
    "set_masks", "summarize", "token_logprobs", "train_link_items", "write_json", "write_plots",
]
