"""Export a run to a transformers `LlamaForCausalLM` directory, and the one Genesis -> transformers weight mapping.

    python -m genesis.export --checkpoint runs/cpu --out exports/cpu                  # fp32, the exact weights
    python -m genesis.export --checkpoint runs/cpu/checkpoint.pt --out exports/cpu-bf16 --dtype bf16

The directory holds config.json, model.safetensors, generation_config.json and the tokenizer (tokenizer.json,
tokenizer_config.json: a fast tokenizer with the run's <pad> <s> </s> and mask token), so that

    model = AutoModelForCausalLM.from_pretrained("exports/cpu")
    tokenizer = AutoTokenizer.from_pretrained("exports/cpu")

give the same logits as Genesis (checked after writing; the tests hold fp32 to 1e-5). A run with a connective-type
class head also gets class_head.safetensors (`weight` (K, C), `bias` (K)) and class_head.json (the class names in
order, the mask token): the head reads the final normalised hidden state, `model.model(ids).last_hidden_state`.
A link head (model.link_head) is left out: the exported LM is the same with or without it.
Needs transformers (pip install "genesis-masking[export]").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from genesis.errors import GenesisError, run_cli
from genesis.lexicon import CLASSES
from genesis.model import Llama, ModelArgs
from genesis.tokenizer import PAD_NAMES, find_mask_id

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the Genesis block's submodules -> a transformers LlamaDecoderLayer's
BLOCK_NAMES = {
    "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj", "mlp.w_gate": "mlp.gate_proj", "mlp.w_up": "mlp.up_proj",
    "mlp.w_down": "mlp.down_proj", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
}
FP32_TOLERANCE = 1e-4  # an fp32 export whose logits differ by more is refused (the tests hold it to 1e-5)


class ExportError(GenesisError, ValueError):
    """A run that cannot be exported, or an --out that cannot be written, phrased as one line."""


def hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' LlamaForCausalLM names (lm_head.weight is the embedding when tied).
    The class and link heads, which transformers has no place for, are left out."""
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.blocks):
        for name, module in block.named_modules():
            if name in BLOCK_NAMES:
                state[f"model.layers.{i}.{BLOCK_NAMES[name]}.weight"] = module.weight
    return {k: v.detach() for k, v in state.items()}


def hf_config_kwargs(args: ModelArgs, special: dict[str, int | None] | None = None) -> dict[str, Any]:
    """transformers.LlamaConfig(**these) describes the same network: rotate-half RoPE with the model's theta,
    RMSNorm eps, grouped-query heads, SwiGLU, no biases, tied or untied head; `special` sets bos/eos/pad ids."""
    special = special or {}
    return dict(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        hidden_act="silu", max_position_embeddings=args.seq_len, rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta, tie_word_embeddings=args.tie_embeddings, attention_bias=False, mlp_bias=False,
        attention_dropout=0.0, initializer_range=0.02,
        bos_token_id=special.get("bos"), eos_token_id=special.get("eos"), pad_token_id=special.get("pad"),
    )


def to_transformers(model: Llama, special: dict[str, int | None] | None = None):
    """A transformers LlamaForCausalLM (fp32, eval mode) holding `model`'s weights."""
    import transformers

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_kwargs(model.args, special)))
    hf.load_state_dict({k: v.float().clone() for k, v in hf_state_dict(model).items()}, strict=True)
    return hf.eval()


def special_tokens(tokenizer: Tokenizer, mask_token: str = "") -> dict[str, str]:
    """The tokenizer's special tokens by transformers role: pad, bos (<s>), eos (</s>) where it has them, and the
    mask token (always: a run's tokenizer has one)."""
    names = {"mask": tokenizer.id_to_token(find_mask_id(tokenizer, mask_token))}
    for role, candidates in (("pad", PAD_NAMES), ("bos", ("<s>", "[CLS]")), ("eos", ("</s>", "[SEP]"))):
        found = next((c for c in candidates if tokenizer.token_to_id(c) is not None), None)
        if found is not None:
            names[role] = found
    return names


def hf_tokenizer(tokenizer: Tokenizer, mask_token: str = "", max_length: int | None = None):
    """The run's tokenizer as a transformers fast tokenizer (no BOS/EOS added on encode, as Genesis trains)."""
    from transformers import PreTrainedTokenizerFast

    names = special_tokens(tokenizer, mask_token)
    kwargs = {f"{role}_token": name for role, name in names.items()}
    if max_length:
        kwargs["model_max_length"] = max_length
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.to_str()), **kwargs)


def max_logit_difference(model: Llama, hf_model, ids: torch.Tensor) -> float:
    """max |Genesis logits - transformers logits| (fp32) over `ids` (B, T)."""
    with torch.no_grad():
        ours = model(ids)[0].float()
        theirs = hf_model(ids).logits.float()
    return (ours - theirs).abs().max().item()


def check_ids(tokenizer: Tokenizer, length: int) -> torch.Tensor:
    """A (1, length) window of real text for the logits check (Genesis 1:1-3, repeated to fill the window)."""
    text = ("In the beginning God created the heaven and the earth.\nAnd the earth was without form, and void; and "
            "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.\n"
            "And God said, Let there be light: and there was light.\n")
    ids = tokenizer.encode(text).ids
    ids = (ids * (length // max(len(ids), 1) + 1))[:length]
    return torch.tensor([ids], dtype=torch.long)


def export_run(checkpoint: str | os.PathLike, out: str | os.PathLike, dtype: str = "fp32") -> dict[str, Any]:
    """Write the run at `checkpoint` (its directory or checkpoint.pt) to the empty or new directory `out`. Returns
    a summary: the output directory, the files written, the logits check (max |difference| against Genesis)."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: must be one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: --out exists and is not an empty directory; name a new one")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ExportError('genesis.export needs transformers: pip install "genesis-masking[export]"') from None
    from safetensors.torch import save_file

    from genesis.evaluate.run import load_run  # the model, its config and the tokenizer beside it, each checked

    run = load_run(checkpoint, "cpu")
    model, tok = run.model.float().eval(), run.tokenizer
    names = special_tokens(tok, run.cfg.tokenizer.mask_token)
    special = {role: tok.token_to_id(name) for role, name in names.items()}
    hf_model = to_transformers(model, special)
    hf_model.generation_config = transformers.GenerationConfig(
        bos_token_id=special.get("bos"), eos_token_id=special.get("eos"), pad_token_id=special.get("pad"))
    hf_tok = hf_tokenizer(tok, run.cfg.tokenizer.mask_token, model.args.seq_len)

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")  # written whole, then renamed: no half-written export
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf_model.to(DTYPES[dtype]).save_pretrained(tmp, safe_serialization=True)
        hf_tok.save_pretrained(tmp)
        # the class name transformers 4 and 5 both read (5 writes its own new name, which 4 does not know)
        tok_config = json.loads((tmp / "tokenizer_config.json").read_text())
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
        if model.class_head is not None:
            head = model.class_head
            save_file({"weight": head.weight.detach().to(DTYPES[dtype]).contiguous(),
                       "bias": head.bias.detach().to(DTYPES[dtype]).contiguous()}, str(tmp / "class_head.safetensors"))
            (tmp / "class_head.json").write_text(json.dumps({
                "classes": list(CLASSES),
                "input": "the final normalised hidden state (C) at a masked position: "
                         "AutoModelForCausalLM.from_pretrained(dir).model(input_ids).last_hidden_state",
                "logits": "hidden @ weight.T + bias, one per class, in the order of `classes`",
                "mask_token": names["mask"], "mask_token_id": special["mask"],
            }, indent=2) + "\n")
        # the exported directory, read back as a user reads it, must give Genesis's logits
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp).float().eval()
        diff = max_logit_difference(model, reloaded, check_ids(tok, model.args.seq_len))
        if dtype == "fp32" and not diff <= FP32_TOLERANCE:
            raise ExportError(f"{checkpoint}: the exported model's logits differ from Genesis's by {diff:.3g} "
                              f"(more than {FP32_TOLERANCE:g}): transformers {transformers.__version__} reads the "
                              f"Llama differently; nothing written")
        umask = os.umask(0)
        os.umask(umask)
        for path in tmp.iterdir():  # transformers writes model.safetensors 600: every file as a plain write would be
            path.chmod(0o666 & ~umask)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "checkpoint": str(run.checkpoint), "step": run.step, "dtype": dtype,
            "files": sorted(p.name for p in out.iterdir()), "max_logit_difference": diff, "seq_len": model.args.seq_len,
            "class_head": model.class_head is not None}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m genesis.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a run directory or its checkpoint.pt")
    p.add_argument("--out", required=True, help="the directory to write (new, or empty)")
    p.add_argument("--dtype", default="fp32", help="weights in fp32 (default: the exact weights), bf16 or fp16")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its load and save bars would be the command's only other output
    except ImportError:
        pass  # export_run says what to install
    return run_cli(lambda: _export(args))


def _export(args: argparse.Namespace) -> int:
    summary = export_run(args.checkpoint, args.out, args.dtype)
    head = " (+ class head)" if summary["class_head"] else ""
    print(f"exported {summary['checkpoint']} (step {summary['step']}) to {summary['out']} as {summary['dtype']}{head}: "
          f"{', '.join(summary['files'])}")
    print(f"logits check: max |transformers - Genesis fp32| = {summary['max_logit_difference']:.2e} over a "
          f"{summary['seq_len']}-token window of Genesis 1:1-3")
    return 0


if __name__ == "__main__":
    sys.exit(main())
