"""The trainer's metrics records and console lines: what a log step and a held-out evaluation write to metrics.jsonl
(and TensorBoard) and print, built from their summed values (docs/training.md#metricsjsonl)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from genesis.train import Run

# the (cross-entropy sum, correct, labelled) statistics of each head, as `accumulate_gradients` returns them
HEAD_STATS = {"class": ("class_loss_sum", "class_correct", "class_labelled"),
              "link": ("link_loss_sum", "link_correct", "link_labelled")}


def heads_of(model) -> list[str]:
    """The heads `model` has, of "class" and "link", in that order."""
    return [name for name in HEAD_STATS if getattr(model, f"{name}_head", None) is not None]


def head_means(values: dict[str, float], name: str) -> tuple[float | None, float | None, float]:
    """A head's mean loss and accuracy over its labelled positions (None without any), and their number."""
    loss_sum, correct, labelled = (values[key] for key in HEAD_STATS[name])
    return (loss_sum / labelled, correct / labelled, labelled) if labelled else (None, None, labelled)


def train_record(run: Run, done: int, values: dict[str, float], lr: float, grad_norm: torch.Tensor,
                 dt: float) -> tuple[dict, str]:
    """The train record and console line of log step `done` (`values` from `genesis.train.step_values`, `dt` the
    mean seconds per step since the last log line)."""
    t, world, device = run.cfg.training, run.world, run.device
    tokens = t.micro_batch * run.cfg.model.seq_len * t.grad_accum * world.size
    rec = {"kind": "train", "step": done, "loss": values["loss"] / world.size, "lr": lr,
           "grad_norm": grad_norm.item(), "tokens_per_s": tokens / dt, "ms_per_step": dt * 1000}
    line = (f"step {done:>6}/{t.steps} | loss {rec['loss']:.4f} | lr {lr:.2e} | grad {rec['grad_norm']:.3f}"
            f" | {rec['tokens_per_s'] / 1e3:8.1f}k tok/s | {rec['ms_per_step']:7.1f} ms/step")
    if run.masker is not None:
        rec["masked_fraction"] = values["masked_tokens"] / tokens
        if run.masker.control_arm is None:
            rec["masked_connectives"] = round(values["masked_words"])
            rec["connective_words"] = round(values["matched_words"])
            line += f" | masked {100 * rec['masked_fraction']:.2f}% of tokens, {rec['masked_connectives']} connectives"
        else:  # the control arm: its words, and the real connectives it must leave alone
            rec["masked_connectives"] = round(values["masked_connective_words"])
            rec["connective_words"] = round(values["connective_words"])
            rec["masked_control_words"] = round(values["masked_words"])
            rec["control_words"] = round(values["matched_words"])
            line += (f" | masked {100 * rec['masked_fraction']:.2f}% of tokens, {rec['masked_control_words']} of "
                     f"{rec['control_words']} control words, {rec['masked_connectives']} of "
                     f"{rec['connective_words']} connectives")
        if run.cfg.masking.chain:
            rec["masked_chains"], rec["masked_chain_words"] = (round(values["masked_chains"]),
                                                               round(values["masked_chain_words"]))
            line += f" ({rec['masked_chains']} causal chains of {rec['masked_chain_words']})"
    if run.guard.skipped:
        rec["skipped_steps"] = len(run.guard.skipped)
    # the class head over this step's masked tokens (every piece of a masked word), the link head over its readouts
    for name in heads_of(run.model):
        rec[f"{name}_loss"], rec[f"{name}_accuracy"], labelled = head_means(values, name)
        if labelled:
            line += f" | {name} loss {rec[f'{name}_loss']:.3f} acc {100 * rec[f'{name}_accuracy']:.1f}%"
    if device.type == "cuda":
        rec["mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        line += f" | mem {rec['mem_gb']:.1f} GB"
    return rec, line


def eval_record(result: dict, step: int) -> tuple[dict, str]:
    """The eval record and console line of the held-out evaluation `result` (`genesis.heldout.evaluate_loss`) of
    step `step`."""
    loss = result["loss"]
    rec = {"kind": "eval", "step": step, "heldout_loss": loss, "heldout_ppl": math.exp(min(loss, 50))}
    line = f"eval step {step} | held-out loss {loss:.4f} | ppl {rec['heldout_ppl']:.2f}"
    if result.get("connective_words"):
        rec.update({f"heldout_{key}": result[key]
                    for key in ("connective_accuracy", "connective_logprob", "connective_words", "by_connective")})
        line += (f" | {result['connective_words']} connectives: next-token "
                 f"{100 * result['connective_accuracy']:.1f}%, log p {result['connective_logprob']:.2f}")
    for name, counted, what in (("class", "tokens", "masked tokens"), ("link", "targets", "readout positions")):
        if f"{name}_loss" in result:
            rec.update({f"heldout_{key}": result[key] for key in (f"{name}_loss", f"{name}_accuracy",
                                                                   f"{name}_{counted}")})
            if result[f"{name}_{counted}"]:
                line += (f" | {name} head: loss {result[f'{name}_loss']:.3f}, accuracy "
                         f"{100 * result[f'{name}_accuracy']:.1f}% at {result[f'{name}_{counted}']} {what}")
    return rec, line
