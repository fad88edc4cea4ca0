"""Sample text from a run: what the model writes after a prompt, optionally with the prompt's connectives masked.

    python -m genesis.sample --checkpoint runs/cpu --prompt "Therefore"                  # 3 samples, seed 0
    python -m genesis.sample --checkpoint runs/cpu --prompt "And God said" -n 1 --temperature 0   # greedy
    python -m genesis.sample --checkpoint runs/masked --prompt "For the LORD is good" --mask-connectives

The same checkpoint, prompt, settings and --seed give the same text (on the same device). --temperature 0 is
greedy decoding; --top-k K samples among the K most likely tokens (0: all). The prompt is encoded as it is (verses
in the training text are joined with a newline: a newline in the prompt starts a new verse). The context is cropped to
the model's seq_len (a plain loop without a KV cache: the models are small). --mask-connectives replaces every
connective of the prompt that the run's lexicon knows by the mask token first (the run's masker with probability 1)
and prints the masked prompt: what the model writes after a masked connective.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from genesis.errors import GenesisError, run_cli
from genesis.model import Llama


class SampleError(GenesisError, ValueError):
    """A bad sampling setting, phrased as one line."""


@dataclass
class SampleSettings:
    max_tokens: int = 60  # new tokens per sample
    temperature: float = 0.8  # 0: greedy
    top_k: int = 50  # 0: the whole vocabulary
    seed: int = 0

    def check(self) -> None:
        if self.max_tokens < 1:
            raise SampleError(f"--max-tokens {self.max_tokens}: must be >= 1")
        if not self.temperature >= 0:  # also refuses nan
            raise SampleError(f"--temperature {self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise SampleError(f"--top-k {self.top_k}: must be >= 0 (0: no cut)")


@torch.no_grad()
def generate(model: Llama, prompt: torch.Tensor, settings: SampleSettings, n: int = 1) -> torch.Tensor:
    """(n, P + max_tokens) ids: `prompt` (P ids) followed by each sample's new tokens. The draws come from a
    generator seeded with settings.seed on the model's device."""
    settings.check()
    device = prompt.device
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    idx = prompt.view(1, -1).expand(n, -1)  # (n, P)
    for _ in range(settings.max_tokens):
        logits = model(idx[:, -model.args.seq_len:])[0][:, -1, :].float()  # (n, V)
        if settings.temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / settings.temperature
            if settings.top_k and settings.top_k < logits.size(-1):
                kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)  # (n, 1)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def mask_prompt(ids: list[int], tokenizer, cfg) -> tuple[list[int], int]:
    """`ids` with every connective of the run's lexicon replaced by its mask token, and the count of masked words."""
    from genesis.config import MaskingConfig
    from genesis.masking import ConnectiveMasker, resolve_lexicon
    from genesis.tokenizer import find_mask_id

    # the run's lexicon and nothing else of its masking: its schedule, adaptive weights or chains would each need
    # settings that masking every connective has no use for
    every = MaskingConfig(strategy="uniform", mask_prob=1.0, replacement="mask", impl="torch")
    masker = ConnectiveMasker(resolve_lexicon(tokenizer, cfg.masking), every,
                              find_mask_id(tokenizer, cfg.tokenizer.mask_token), log=None)
    out = masker(torch.tensor([ids]), step=0)
    words = masker.stats(out, torch.tensor([ids]))["masked_words"]
    return out.input_ids[0].tolist(), int(words)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m genesis.sample", description=__doc__.split("\n")[0])
    defaults = SampleSettings()
    p.add_argument("--checkpoint", required=True, help="a run directory or its checkpoint.pt")
    p.add_argument("--prompt", required=True, help='the text to continue, e.g. "Therefore"')
    p.add_argument("-n", type=int, default=3, help="samples (default 3)")
    p.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="new tokens per sample (default 60)")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="0: greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="the k likeliest only (default 50; 0: all)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="the same seed gives the same text (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    p.add_argument("--mask-connectives", action="store_true",
                   help="mask the prompt's connectives (the run's lexicon) before generating")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from genesis.evaluate.run import load_run, resolve_device

    args = parse_args(argv)
    settings = SampleSettings(args.max_tokens, args.temperature, args.top_k, args.seed)

    def body() -> int:
        settings.check()
        if args.n < 1:
            raise SampleError(f"-n {args.n}: must be >= 1")
        device = resolve_device(args.device)
        run = load_run(args.checkpoint, device)
        ids = run.tokenizer.encode(args.prompt).ids
        if not ids:
            raise SampleError("--prompt is empty: give some text to continue")
        header = (f"{run.checkpoint} (step {run.step}) | temperature {settings.temperature:g} | top-k "
                  f"{settings.top_k} | seed {settings.seed}")
        print(header)
        if args.mask_connectives:
            ids, words = mask_prompt(ids, run.tokenizer, run.cfg)
            print(f"masked prompt ({words} connective{'s' * (words != 1)}): "
                  f"{run.tokenizer.decode(ids, skip_special_tokens=False)!r}")
        samples = generate(run.model, torch.tensor(ids, device=device), settings, args.n)
        for i, row in enumerate(samples.tolist(), 1):
            print(f"--- sample {i}")
            print(run.tokenizer.decode(row, skip_special_tokens=False))
        return 0

    try:
        return run_cli(body)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
