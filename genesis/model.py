"""A Llama-style decoder: RMSNorm, rotary position embeddings, SwiGLU MLP, causal SDPA attention, an optional
connective-type classification head and an optional link head.

Reads top to bottom in forward-pass order. Shapes: B batch, T time, C = dim, H heads, D = C / H head dim,
K connective classes, W lexicon words.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from genesis.config import Config, ConfigError, ModelConfig
from genesis.errors import InputError
from genesis.flags import IGNORE_INDEX
from genesis.lexicon import CLASSES
from genesis.link import link_features


@dataclass
class ModelArgs:
    vocab_size: int
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    seq_len: int
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    n_classes: int = 0  # connective classes of the classification head; 0: no head (checkpoints before it had none)
    link_words: int = 0  # lexicon words the link head names (the masker's lexicon entries); 0: no link head
    link_readout: str = "span"  # what the link head reads (genesis.link.link_features)

    @classmethod
    def from_config(cls, cfg: ModelConfig, vocab_size: int, link_words: int = 0) -> ModelArgs:
        """`link_words`: the masker's lexicon entries (`len(masker.lexicon.words)`), for model.link_head; without
        it the head is left out (a lower bound for `check_memory`)."""
        ffn = cfg.ffn_dim or 64 * math.ceil(8 * cfg.dim / 3 / 64)
        return cls(vocab_size=vocab_size, n_layers=cfg.n_layers, dim=cfg.dim, n_heads=cfg.n_heads,
                   n_kv_heads=cfg.n_kv_heads or cfg.n_heads, ffn_dim=ffn, seq_len=cfg.seq_len,
                   tie_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps,
                   n_classes=len(CLASSES) if cfg.class_head else 0, link_words=link_words if cfg.link_head else 0,
                   link_readout=cfg.link_readout)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32: bf16 has too few mantissa bits for the mean of squares
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # (T, D/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); rotate pairs (x[..., :D/2], x[..., D/2:]) — the "rotate half" convention. cos, sin: the table
    # (>= T, D/2), whose first T rows are positions 0..T-1, or (B, 1, T, D/2): each row its own positions
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[..., : x.size(-2), :], sin[..., : x.size(-2), :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Past(NamedTuple):
    """What a batch of continuations attends to before itself: cached prefixes' keys and values (N, H_kv, P, D),
    RoPE applied; the prefix each row continues, rows (B,); and which keys each query may see, (B, 1, T, P + T)
    bool: its prefix's real tokens and, causally, its own row."""

    keys: torch.Tensor
    values: torch.Tensor
    rows: torch.Tensor
    mask: torch.Tensor


def after_prefix(prefix: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, H, P + T, D): row b is prefix[rows[b]] (of N, H, P, D), then x[b] (of B, H, T, D). Gathered straight into
    place: one copy, where indexing and then concatenating copy the prefixes twice."""
    B, H, T, D = x.shape
    P = prefix.size(2)
    out = x.new_empty(B, H, P + T, D)
    torch.index_select(prefix, 0, rows, out=out[:, :, :P])
    out[:, :, P:] = x
    return out


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.dim // a.n_heads
        self.wq = nn.Linear(a.dim, a.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(a.dim, a.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(a.dim, a.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * self.head_dim, a.dim, bias=False)

    def forward(self, x, cos, sin, past: Past | None = None, keep: list | None = None):
        """Causal self-attention over x (B, T, C); with `past`, x's rows continue cached prefixes and attend to them
        first; with `keep`, this layer's (keys, values) are appended to it, for continuations of x to read."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if keep is not None:
            keep.append((k, v))
        if past is not None:
            k, v = after_prefix(past.keys, past.rows, k), after_prefix(past.values, past.rows, v)  # (B, H_kv, P + T, D)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if past is None else past.mask,
                                           is_causal=past is None)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.w_gate = nn.Linear(a.dim, a.ffn_dim, bias=False)
        self.w_up = nn.Linear(a.dim, a.ffn_dim, bias=False)
        self.w_down = nn.Linear(a.ffn_dim, a.dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(a.dim, a.norm_eps), Attention(a)
        self.mlp_norm, self.mlp = RMSNorm(a.dim, a.norm_eps), SwiGLU(a)

    def forward(self, x, cos, sin, past: Past | None = None, keep: list | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, past, keep)
        return x + self.mlp(self.mlp_norm(x))


class ClassLoss(NamedTuple):
    """A head's loss on one batch (the class head's, the link head's): 0-d tensors, no host sync."""

    loss: torch.Tensor  # mean cross-entropy over the labelled positions (0 when there are none)
    correct: torch.Tensor  # labelled positions whose argmax is the label
    count: torch.Tensor  # labelled positions (labels != -100)


def class_loss(class_logits: torch.Tensor, classes: torch.Tensor) -> ClassLoss:
    """Cross-entropy of (B, T, K) class logits against (B, T) labels, -100 where there is none. Dense over every
    position, so the same ops run whatever is masked (no data-dependent shapes for torch.compile, and the head is
    in the graph of every batch, as DistributedDataParallel needs, if with a zero gradient)."""
    logits = class_logits.float().view(-1, class_logits.size(-1))
    labels = classes.reshape(-1)
    labelled = labels != IGNORE_INDEX
    count = labelled.sum()
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((logits.argmax(-1) == labels) & labelled).sum()
    return ClassLoss(total / count.clamp(min=1), correct, count)


class PrefixCache(NamedTuple):
    """Keys and values of a batch of right-padded prefixes (`Llama.read_prefixes`), for their continuations."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per block: (keys, values), each (N, H_kv, P, D), RoPE applied
    lengths: torch.Tensor  # (N,) real tokens of each prefix; the positions after them are padding


class Llama(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.grad_checkpointing = False
        self.embed = nn.Embedding(a.vocab_size, a.dim)
        self.blocks = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.lm_head = nn.Linear(a.dim, a.vocab_size, bias=False)
        if a.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(a.dim // a.n_heads, a.seq_len, a.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        # GPT-2 style: scale the residual projections by 1/sqrt(2 * n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w_down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * a.n_layers))
        # the heads, built last, on a forked generator: the trunk, and every draw after the model, are those of a
        # model without them, so a run with a head is paired with one without (the same seed, the same initial weights)
        self.class_head, self.link_head = None, None
        with torch.random.fork_rng(devices=[]):
            if a.n_classes:  # the connective type (genesis.lexicon.CLASSES) of a masked token, from its position
                self.class_head = self._head(a.dim, a.n_classes)
            if a.link_words:  # a masked word's lexicon entry, at its readout position (genesis.link)
                self.link_head = self._head(a.dim, a.link_words)

    @staticmethod
    def _head(dim: int, outputs: int) -> nn.Linear:
        head = nn.Linear(dim, outputs)
        nn.init.normal_(head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(head.bias)  # uniform over the outputs at the start
        return head

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states (B, T, C) for token ids (B, T)."""
        T = idx.size(1)
        if T > self.args.seq_len:
            raise InputError(f"sequence length {T} exceeds the model's seq_len {self.args.seq_len}")
        x = self.embed(idx)  # (B, T, C)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, self.rope_cos, self.rope_sin, use_reentrant=False)
            else:
                x = block(x, self.rope_cos, self.rope_sin)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, classes: torch.Tensor | None = None,
                readout: torch.Tensor | None = None, readout_start: torch.Tensor | None = None):
        """Logits (B, T, V); with targets (B, T), also the mean cross-entropy over non-ignored targets. With classes
        (B, T) (the masker's `out.classes`: a class id at masked positions, -100 elsewhere), also the class head's
        `ClassLoss` at the labelled positions, from the hidden state there (which sees the mask token and what
        precedes it): (logits, loss, class_loss). With readout and readout_start (B, T) (the masker's `out.readout`
        and `out.readout_start`), also the link head's `ClassLoss` at the readout positions:
        (logits, loss, class_loss or None without classes, link_loss)."""
        h = self.hidden(idx)
        logits = self.lm_head(h)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        if classes is None and readout is None:
            return logits, loss
        heads = [None]
        if classes is not None:
            if self.class_head is None:
                raise InputError("classes given, but this model has no class head (model.class_head = false)")
            heads[0] = class_loss(self.class_head(h), classes)  # (B, T, K) logits: K x C per token, cheap
        if readout is not None:
            if self.link_head is None or readout_start is None:
                raise InputError("readout given, but this model has no link head (model.link_head = false)"
                                 if self.link_head is None else "readout given without readout_start")
            heads.append(self.link_loss(h, readout, readout_start))
        return logits, loss, *heads

    def link_loss(self, h: torch.Tensor, readout: torch.Tensor, readout_start: torch.Tensor) -> ClassLoss:
        """The link head's `ClassLoss` at the readout positions, from final hidden states h (B, T, C), reading what
        `args.link_readout` names (genesis.link.link_features)."""
        return class_loss(self.link_head(link_features(h, readout_start, self.args.link_readout)), readout)

    # Continuations of cached prefixes: many endings of one left context (the cloze candidates of an item) read the
    # context once, not once per ending

    def read_prefixes(self, idx: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, PrefixCache]:
        """Hidden states (N, P, C) of right-padded prefixes idx (N, P) whose real tokens number lengths (N,), as
        `hidden` gives them (causal: a real position never sees the padding after it), and the prefixes' keys and
        values for `continue_prefixes`."""
        if idx.size(1) > self.args.seq_len:
            raise InputError(f"prefix length {idx.size(1)} exceeds the model's seq_len {self.args.seq_len}")
        layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        x = self.embed(idx)  # (N, P, C)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin, keep=layers)
        return self.norm(x), PrefixCache(layers, lengths)

    def continue_prefixes(self, idx: torch.Tensor, cache: PrefixCache, prefix_of: torch.Tensor) -> torch.Tensor:
        """Hidden states (R, T, C) of continuations idx (R, T): row r continues prefix prefix_of[r] of `cache`, its
        token t at position lengths[prefix_of[r]] + t, seeing that prefix's real tokens and, causally, its own row:
        what `hidden` gives for the prefix and the continuation as one sequence. Right padding in idx is seen only
        by the padding after it."""
        R, T = idx.shape
        P = cache.layers[0][0].size(2)
        lengths = cache.lengths[prefix_of]  # (R,)
        if int(lengths.max()) + 1 > self.args.seq_len:
            raise InputError(f"a continuation starts at position {int(lengths.max())}, past the model's seq_len "
                             f"{self.args.seq_len}")
        # right padding may run past the last position: clamped there, it is never read
        positions = (lengths[:, None] + torch.arange(T, device=idx.device)).clamp(max=self.args.seq_len - 1)
        cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (R, 1, T, D/2)
        real_prefix = torch.arange(P, device=idx.device) < lengths[:, None]  # (R, P)
        causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
        mask = torch.cat([real_prefix[:, None, None, :].expand(R, 1, T, P), causal.expand(R, 1, T, T)], dim=-1)
        x = self.embed(idx)  # (R, T, C)
        for block, (keys, values) in zip(self.blocks, cache.layers):
            x = block(x, cos, sin, Past(keys, values, prefix_of, mask))
        return self.norm(x)


# ----------------------------------------------------------------------------------------------------------------
# Memory: a lower bound checked before a run starts, so that a model or batch that cannot fit is one line


def param_count(a: ModelArgs) -> int:
    """The parameters of `Llama(a)` (tied weights once), computed without building it."""
    head_dim = a.dim // a.n_heads
    attention = 2 * a.dim * a.n_heads * head_dim + 2 * a.dim * a.n_kv_heads * head_dim  # wq, wo; wk, wv
    block = attention + 3 * a.dim * a.ffn_dim + 2 * a.dim  # SwiGLU's three matrices, two RMSNorm gains
    embeddings = a.vocab_size * a.dim * (1 if a.tie_embeddings else 2)
    return embeddings + a.n_layers * block + a.dim + (a.n_classes + a.link_words) * (a.dim + 1)


def training_memory(a: ModelArgs, micro_batch: int, grad_checkpointing: bool, bf16: bool) -> tuple[int, int]:
    """A lower bound on training memory in bytes: (parameters with their gradients and AdamW state, activations of
    one micro-batch). Lower, so that it refuses only what surely cannot fit: 16 B per parameter (fp32 weight,
    gradient and two AdamW moments); the fp32 logits (B, T, V), and per block at least its input and the SwiGLU's
    two hidden tensors (its input only under gradient checkpointing, plus one block recomputed), in the autocast
    dtype. Attention scores, the optimizer's temporaries and the allocator's slack come on top."""
    tokens = micro_batch * a.seq_len
    width = 2 if bf16 else 4
    block = tokens * (a.dim + 2 * a.ffn_dim) * width
    saved = a.n_layers * tokens * a.dim * width + block if grad_checkpointing else a.n_layers * block
    return 16 * param_count(a), tokens * a.vocab_size * 4 + saved


def free_memory(device: torch.device) -> int | None:
    """Bytes free for a run on `device`: the GPU's free memory, or the system's available RAM (MemAvailable, else
    the free pages); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):  # not a POSIX system
        return None


PARAMETER_KEYS = ("model.n_layers", "model.dim", "model.n_kv_heads", "model.ffn_dim", "model.tie_embeddings",
                  "model.class_head", "model.link_head", "tokenizer.vocab_size")
ACTIVATION_KEYS = PARAMETER_KEYS + ("model.seq_len", "training.micro_batch", "training.grad_checkpointing")


def _where(cfg: Config, keys: tuple[str, ...] = PARAMETER_KEYS) -> str:
    """The --set and --mode that set one of `keys`, else the config file."""
    return ", ".join(dict.fromkeys(cfg.origin_of(k) for k in keys if cfg.origin_of(k) != cfg.source)) or cfg.source


def _gib(n: float) -> str:
    if n < 2**30:
        return f"{n / 2**20:,.1f} MiB"
    return f"{n / 2**30:,.1f} GiB" if n < 2**50 else f"{n / 2**30:.2e} GiB"


def _params(n: int) -> str:
    return f"{n / 1e6:,.1f} M parameters" if n < 1e12 else f"{n:.2e} parameters"


def check_memory(cfg: Config, vocab_size: int, device: torch.device, free: int | None = None) -> None:
    """A ConfigError (one line, naming the --set, --mode or file that sized it) when the model's parameters with
    their gradients and AdamW state, or those and one micro-batch's activations, cannot fit the memory free on
    `device` (`free`: that many bytes instead of asking the device)."""
    a = ModelArgs.from_config(cfg.model, vocab_size)
    t = cfg.training
    bf16 = device.type == "cuda" and t.dtype != "fp32"
    state, activations = training_memory(a, t.micro_batch, t.grad_checkpointing, bf16)
    free = free_memory(device) if free is None else free
    if free is None or state + activations <= free:
        return
    on = f"{device} has {_gib(free)} free" if device.type == "cuda" else f"the CPU has {_gib(free)} of RAM available"
    if state > free:
        raise ConfigError(f"{_where(cfg)}: model: {_params(param_count(a))} need at least {_gib(state)} for "
                          f"their weights, gradients and AdamW state (16 B each), but {on}; make the model smaller "
                          f"(model.dim, model.n_layers, model.ffn_dim)")
    raise ConfigError(f"{_where(cfg, ACTIVATION_KEYS)}: training.micro_batch: {t.micro_batch} x {a.seq_len} tokens "
                      f"need at least "
                      f"{_gib(activations)} of activations besides {_gib(state)} for the parameters, gradients and "
                      f"AdamW state, but {on}; lower training.micro_batch (raise training.grad_accum to keep the "
                      f"step) or model.seq_len" + ("" if t.grad_checkpointing else
                                                   ", or set training.grad_checkpointing = true"))


def out_of_memory(e: BaseException) -> str | None:
    """What an allocation failure says, in a few words (the size tried, where the allocator says it); None for any
    other error. torch.OutOfMemoryError (CUDA) is a RuntimeError, and so is the CPU allocator's "can't allocate
    memory"; Python's own is MemoryError."""
    if not isinstance(e, (MemoryError, RuntimeError)):
        return None
    text = str(e).strip()
    if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and not re.search(
            r"out of memory|can't allocate memory|tried to allocate|failed to allocate", text, re.IGNORECASE):
        return None  # not "an illegal memory access", say
    found = re.search(r"(?:can't allocate memory: you tried to allocate|Tried to allocate) [^.(]+", text)
    return found.group(0).strip() if found else (text.splitlines() or [type(e).__name__])[0][:160]


def build_model(a: ModelArgs, device: torch.device, cfg: Config) -> Llama:
    """`Llama(a)` on `device`; an allocation that fails there (beyond what `check_memory` foresaw) is a ConfigError
    in one line, not the allocator's traceback."""
    try:
        return Llama(a).to(device)
    except (MemoryError, RuntimeError) as e:
        reason = out_of_memory(e)
        if reason is None:
            raise
        raise ConfigError(f"{_where(cfg)}: model: {_params(param_count(a))} cannot be allocated on {device} "
                          f"({reason}); make the model smaller (model.dim, model.n_layers, model.ffn_dim)") \
            from None
