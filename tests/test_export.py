"""genesis.export: a run becomes a transformers LlamaForCausalLM directory with Genesis's logits, its tokenizer
(mask token included) and its class head; bad input is one line."""

import json
import os
import re

import pytest
import torch

from genesis import export
from genesis.evaluate import load_run
from genesis.lexicon import CLASSES

transformers = pytest.importorskip("transformers")

FP32_ATOL = 1e-5  # logits of the fp32 export against Genesis's (the cpu.toml run measured 2-4e-6)


@pytest.fixture(scope="module")
def exported(tiny_runs, tmp_path_factory):
    """Each tiny run exported in fp32 through the command-line entry point."""
    root = tmp_path_factory.mktemp("exports")
    outs = {}
    for name, run_dir in tiny_runs.items():
        outs[name] = root / name
        assert export.main(["--checkpoint", str(run_dir), "--out", str(outs[name])]) == 0
    return outs


def rope_theta(config) -> float:
    """transformers 4 keeps rope_theta on the config, 5 in rope_parameters."""
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(config, "rope_theta", None))


@pytest.mark.parametrize("name", ["tied", "untied-head"])
def test_the_export_loads_in_transformers_with_genesis_logits(tiny_runs, exported, name):
    run = load_run(tiny_runs[name])
    args = run.model.args
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported[name]).float().eval()
    cfg = hf.config
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == \
        (args.vocab_size, args.dim, args.ffn_dim, args.n_layers)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (args.n_heads, args.n_kv_heads)
    assert cfg.max_position_embeddings == args.seq_len and cfg.rms_norm_eps == args.norm_eps
    assert rope_theta(cfg) == args.rope_theta == (500.0 if name == "untied-head" else 10000.0)
    assert cfg.tie_word_embeddings == args.tie_embeddings == (name == "tied")
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert tied == (name == "tied")
    tok = run.tokenizer
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == \
        (tok.token_to_id("<pad>"), tok.token_to_id("<s>"), tok.token_to_id("</s>")) == (0, 1, 2)

    ids = torch.randint(0, args.vocab_size, (2, args.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = run.model(ids)[0], hf(ids).logits
    assert ours.abs().max() > 0.5  # not a degenerate comparison (large weights: tests/test_model.py)
    torch.testing.assert_close(theirs, ours, atol=FP32_ATOL, rtol=0)


def test_the_tokenizer_is_the_runs_as_a_fast_tokenizer_with_its_mask_token(tiny_runs, exported):
    assert json.loads((exported["tied"] / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"  # a name transformers 4 knows too
    tok = transformers.AutoTokenizer.from_pretrained(exported["tied"])
    ours = load_run(tiny_runs["tied"]).tokenizer
    assert tok.is_fast and len(tok) == ours.get_vocab_size(with_added_tokens=True)
    assert (tok.mask_token, tok.mask_token_id) == ("[MASK]", 3)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "And God said, Let there be light: and there was light.\nTherefore the [MASK] rested."
    assert tok(text)["input_ids"] == ours.encode(text).ids  # no BOS/EOS added: the model never saw them
    assert tok.decode(ours.encode(text).ids) == text


def test_the_class_head_is_saved_beside_the_model_and_reads_its_last_hidden_state(tiny_runs, exported):
    from safetensors.torch import load_file

    assert not (exported["tied"] / "class_head.safetensors").exists()
    out = exported["untied-head"]
    meta = json.loads((out / "class_head.json").read_text())
    assert meta["classes"] == list(CLASSES) and (meta["mask_token"], meta["mask_token_id"]) == ("[MASK]", 3)
    head = load_file(str(out / "class_head.safetensors"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    model = load_run(tiny_runs["untied-head"]).model
    ids = torch.randint(4, model.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    ids[:, 7] = 3
    with torch.no_grad():
        ours = model.class_head(model.hidden(ids))
        theirs = hf.model(ids).last_hidden_state @ head["weight"].T + head["bias"]  # as class_head.json says
    torch.testing.assert_close(theirs, ours, atol=FP32_ATOL, rtol=0)


def test_the_link_head_is_dropped_and_the_lm_is_unchanged(tmp_path, exported, capsys):
    """A run with the link head (and no class head) exports the LM alone: the same files as a run without heads,
    no link weights in model.safetensors, and transformers' logits equal to Genesis's."""
    from safetensors import safe_open

    from genesis.config import load_config
    from genesis.train import train

    sets = ["model.n_layers=2", "model.dim=64", "model.n_heads=2", "model.ffn_dim=128", "model.seq_len=64",
            "training.micro_batch=8", "training.steps=2", "training.eval_every=0", "training.log_every=1",
            "masking.enabled=true", "masking.readout=true", "model.link_head=true"]
    train(load_config("cpu.toml", overrides=sets), tmp_path / "run")
    assert export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert "(+ class head)" not in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in exported["tied"].iterdir())
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "link" in k or "head" in k and k != "lm_head.weight"]
    model = load_run(tmp_path / "run").model
    assert model.link_head is not None
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    ids = torch.randint(0, model.args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], atol=FP32_ATOL, rtol=0)


def test_the_exported_model_generates_what_genesis_sample_generates_greedily(tiny_runs, exported):
    from genesis.sample import SampleSettings, generate

    run = load_run(tiny_runs["tied"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported["tied"]).float().eval()
    prompt = torch.tensor(run.tokenizer.encode("Therefore the LORD").ids)
    ours = generate(run.model, prompt, SampleSettings(max_tokens=12, temperature=0))
    theirs = hf.generate(prompt[None], max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt)[None])
    assert theirs.tolist() == ours.tolist()


def test_bf16_export_halves_the_weights_and_stays_close(tiny_runs, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "bf16"
    assert export.main(["--checkpoint", str(tiny_runs["untied-head"] / "checkpoint.pt"), "--out", str(out),
                        "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "as bf16 (+ class head)" in printed
    diff = float(re.search(r"logits check: max \|transformers - Genesis fp32\| = (\S+) over", printed).group(1))
    assert 0 < diff < 0.25, diff  # rounded to bf16 (not the fp32 weights), and still close to them
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    with safe_open(str(out / "class_head.safetensors"), "pt") as f:
        assert f.get_tensor("weight").dtype == torch.bfloat16
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16


def test_bad_input_is_one_line_and_writes_nothing(tiny_runs, tmp_path, capsys):
    def error(*argv) -> str:
        assert export.main(list(argv)) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured.err
        return captured.err

    out = tmp_path / "out"
    assert "checkpoint not found" in error("--checkpoint", str(tmp_path / "nowhere"), "--out", str(out))
    assert error("--checkpoint", str(tiny_runs["tied"]), "--out", str(out), "--dtype", "int8").startswith(
        "error: --dtype int8: must be one of fp32, bf16, fp16")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert "not an empty directory" in error("--checkpoint", str(tiny_runs["tied"]), "--out", str(full))
    assert not out.exists() and [p.name for p in full.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary directory left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export.main(["--checkpoint", str(tiny_runs["tied"]), "--out", str(empty)]) == 0  # an empty one is fine
    assert (empty / "config.json").is_file()


def test_every_exported_file_gets_the_mode_a_plain_write_gives(exported):
    """transformers writes model.safetensors with mode 600; the export gives every file 666 less the umask, as the
    tokenizer and config files already had."""
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in exported["tied"].iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes
