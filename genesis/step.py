"""One optimizer step's parts, shared by the trainer and the benchmark: the learning-rate schedule, AdamW, and
forward/backward over the micro-batches of a step."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from genesis.runs import RunError


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to min_lr at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm gains and embeddings of size 1-D are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def weighted_lm_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, T, V) logits against (B, T) targets, each term x its weight (B, T): the weighted mean,
    sum of weighted terms / sum of weights (training.connective_loss_weight)."""
    terms = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    weights = weights.reshape(-1).to(terms.dtype)
    return (terms * weights).sum() / weights.sum()


def head_labels(model, out) -> tuple:
    """What a micro-batch carries after (x, y) for `model`'s heads, from the masker's output `out`: nothing, the
    class labels (classes,), or for a link head (classes or None, readout, readout_start): `accumulate_gradients`'
    micro-batch layout."""
    if getattr(model, "link_head", None) is not None:
        return (out.classes if model.class_head is not None else None), out.readout, out.readout_start
    return (out.classes,) if model.class_head is not None else ()


def accumulate_gradients(model, micro_batches, amp, class_weight: float = 0.0, loss_weights=None,
                         observe=None, link_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward/backward over the micro-batches of one optimizer step; the LM gradients equal those of one batch made
    of all of them (each loss is a mean over its tokens, so each is divided by the number of micro-batches).
    Under DDP the processes' gradients are averaged, once per step.

    A micro-batch is (x, y), or (x, y, classes) for a model with a class head: its loss is then the LM loss plus
    class_weight x the head's mean cross-entropy at that micro-batch's labelled (masked) positions. That term is a
    mean per micro-batch, also divided by their number: its gradient depends on how a step is split into
    micro-batches (not on how they are shared out among processes), as the masked counts differ between them.
    For a model with a link head it is (x, y, classes or None, readout, readout_start), and the loss adds
    link_weight x the link head's mean cross-entropy at the readout positions, likewise.

    `loss_weights`: per micro-batch, None or a (B, T) weight per target: that micro-batch's LM loss is then the
    weighted mean (`weighted_lm_loss`) instead of the model's mean. `observe(i, logits)`: called with micro-batch
    i's detached logits after its forward pass (the adaptive weights' argmax signal, no extra forward).

    Returns this process's mean LM loss as a 0-d tensor and the class head's and the link head's (cross-entropy sum,
    correct, labelled) over the micro-batches as (3,) tensors (zeros without the head), with no host sync."""
    total = None
    stats = [None, None]  # class head, link head
    k = len(micro_batches)
    no_sync = getattr(model, "no_sync", None)  # DistributedDataParallel: all-reduce once, in the last backward
    for i, batch in enumerate(micro_batches):
        with no_sync() if no_sync is not None and i < k - 1 else contextlib.nullcontext():
            weights = loss_weights[i] if loss_weights is not None else None
            with amp:
                if weights is None:
                    logits, loss, *heads = model(*batch)
                else:  # the model's own loss is not computed: its logits, weighted here
                    x, y, *labels = batch
                    logits, _, *heads = model(x, None, *labels)
                    loss = weighted_lm_loss(logits, y, weights)
            heads += [None] * (2 - len(heads))
            objective = loss
            for head, weight in zip(heads, (class_weight, link_weight)):
                if head is not None:
                    objective = objective + weight * head.loss
            (objective / k).backward()
        if observe is not None:
            observe(i, logits.detach())
        total = loss.detach() / k if total is None else total + loss.detach() / k
        for j, head in enumerate(heads):
            if head is not None:
                s = torch.stack([head.loss.detach() * head.count, head.correct.float(), head.count.float()])
                stats[j] = s if stats[j] is None else stats[j] + s
    class_stats, link_stats = (s if s is not None else torch.zeros(3, device=total.device) for s in stats)
    return total, class_stats, link_stats


class NonFiniteError(RunError):
    """A step's loss or gradient norm was NaN or infinite (beyond training.skip_nonfinite), phrased as one line."""


class NonFiniteGuard:
    """The optimizer step, taken only when the step's loss and gradient norm are finite; the non-finite steps found,
    up to `budget` of them skipped (training.skip_nonfinite), then a NonFiniteError.

    No host sync of its own: with a fused optimizer (AdamW on CUDA) the skip happens on the device (the optimizer's
    `found_inf`, as GradScaler uses it: no update, no step count), and `check()` reads the values where the loop
    syncs anyway (a log step, a save). An unfused optimizer (the CPU) is told on the host, which costs nothing there
    (CPU work is synchronous), and so each step is checked as it ends."""

    def __init__(self, optimizer: torch.optim.Optimizer, budget: int, skipped: list[int] | None = None):
        self.optimizer, self.budget = optimizer, budget
        self.on_device = bool(optimizer.defaults.get("fused"))
        self.skipped = list(skipped or [])  # the steps skipped so far in the run (saved in the checkpoint)
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, [loss, grad norm]) not yet checked

    def step(self, done: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Step `done` of the optimizer (1-based), unless `loss` or `grad_norm` is non-finite."""
        values = torch.stack([loss.detach().float(), grad_norm.detach().float()])
        if self.on_device:
            self.optimizer.found_inf = values.isfinite().all().logical_not().float()
            self.optimizer.step()
        elif all(map(math.isfinite, values.tolist())):
            self.optimizer.step()
        self.pending.append((done, values))

    def check(self, sync: bool = True) -> list[str]:
        """The steps not checked yet: one line each for those skipped; a NonFiniteError at the first one beyond
        the budget. `sync` False (a step that is not a log step) checks only where that needs no host sync."""
        if not self.pending or (self.on_device and not sync):
            return []
        steps = [done for done, _ in self.pending]
        values = torch.stack([v for _, v in self.pending]).tolist()
        self.pending = []
        lines = []
        for done, (loss, grad_norm) in zip(steps, values):
            bad = [f"{name} {value}" for name, value in (("loss", loss), ("grad norm", grad_norm))
                   if not math.isfinite(value)]
            if not bad:
                continue
            if len(self.skipped) >= self.budget:
                raise NonFiniteError(f"step {done}: non-finite {' and '.join(bad)}" + (
                    f" (after {len(self.skipped)} skipped, training.skip_nonfinite = {self.budget})"
                    if self.budget else ""))
            self.skipped.append(done)
            lines.append(f"step {done}: non-finite {' and '.join(bad)}: optimizer step skipped "
                         f"({len(self.skipped)} of training.skip_nonfinite = {self.budget})")
        return lines
