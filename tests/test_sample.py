"""genesis.sample: seeded, greedy at temperature 0, top-k, cropped to seq_len, masked prompts; bad input is one
line."""

import pytest
import torch

from genesis import sample
from genesis.evaluate import load_run
from genesis.sample import SampleSettings, generate


def samples(capsys, *argv) -> str:
    assert sample.main(list(argv)) == 0
    return capsys.readouterr().out


def test_the_same_seed_gives_the_same_text_and_another_seed_other_text(tiny_runs, capsys):
    args = ["--checkpoint", str(tiny_runs["tied"]), "--prompt", "Therefore", "-n", "2", "--max-tokens", "20"]
    first = samples(capsys, *args, "--seed", "7")
    assert first == samples(capsys, *args, "--seed", "7")
    other = samples(capsys, *args, "--seed", "8")
    assert other != first and other.splitlines()[0].endswith("seed 8")
    lines = first.splitlines()
    assert lines[0].endswith("(step 4) | temperature 0.8 | top-k 50 | seed 7")
    assert lines[1] == "--- sample 1" and lines[2].startswith("Therefore") and "--- sample 2" in lines


def test_temperature_zero_is_greedy_and_top_k_one_is_too(tiny_runs):
    run = load_run(tiny_runs["tied"])
    model, prompt = run.model, torch.tensor(run.tokenizer.encode("Therefore the LORD").ids)
    greedy = generate(model, prompt, SampleSettings(max_tokens=8, temperature=0, seed=1))
    idx = prompt[None]
    with torch.no_grad():
        for _ in range(8):
            idx = torch.cat([idx, model(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, idx)
    assert torch.equal(generate(model, prompt, SampleSettings(max_tokens=8, temperature=0, seed=2)), greedy)
    assert torch.equal(generate(model, prompt, SampleSettings(max_tokens=8, temperature=1.5, top_k=1)), greedy)
    several = generate(model, prompt, SampleSettings(max_tokens=8, temperature=5.0), n=3)
    assert several.shape == (3, 11) and torch.equal(several[:, :3], prompt.expand(3, -1))
    assert len({tuple(row) for row in several.tolist()}) > 1  # hot samples differ from one another


def test_a_prompt_longer_than_seq_len_is_cropped_to_it(tiny_runs):
    model = load_run(tiny_runs["tied"]).model
    prompt = torch.arange(4, 4 + model.args.seq_len + 6)
    out = generate(model, prompt, SampleSettings(max_tokens=3, temperature=0))
    assert out.shape == (1, len(prompt) + 3)
    with torch.no_grad():  # the first new token is the greedy one after the last seq_len prompt tokens
        assert out[0, len(prompt)] == model(prompt[None, -model.args.seq_len:])[0][0, -1].argmax()


def test_mask_connectives_masks_the_prompts_connectives_and_says_so(tiny_runs, capsys):
    out = samples(capsys, "--checkpoint", str(tiny_runs["untied-head"]), "--prompt",
                  "And there was light. Therefore the LORD", "--mask-connectives", "-n", "1", "--max-tokens", "5",
                  "--temperature", "0")
    masked = out.splitlines()[1]
    assert masked == "masked prompt (1 connective): 'And there was light.[MASK] the LORD'"
    assert out.splitlines()[3].startswith("And there was light.[MASK] the LORD")


@pytest.mark.parametrize("sets", [
    ["masking.strategy=weighted", "masking.adaptive=true"],  # compare's `adaptive` runs
    ["masking.schedule=linear", "masking.schedule_steps=100", "masking.schedule_start=0.2"],
    ["masking.chain=true", "masking.chain_gap=20", "masking.mask_prob=0.1"],
    ["masking.default_connectives=false", "masking.connectives.light={weight = 1.0, class = \"additive\"}"],
])
def test_mask_connectives_reads_only_the_runs_lexicon(tiny_runs, sets, recwarn):
    """A run trained with any masking settings masks every connective of its own lexicon (its adaptive weights or
    schedule once made the masker built from them refuse the uniform strategy), with nothing to warn about."""
    from genesis.config import load_config
    from genesis.sample import mask_prompt

    run = load_run(tiny_runs["untied-head"])
    cfg = load_config("cpu.toml", overrides=["masking.enabled=true", *sets])
    recwarn.clear()
    ids, words = mask_prompt(run.tokenizer.encode("And there was light: therefore the LORD").ids, run.tokenizer, cfg)
    masked = run.tokenizer.decode(ids, skip_special_tokens=False)
    custom = "light" in sets[-1]
    expected = "And there was[MASK]: therefore the LORD" if custom else "And there was light:[MASK] the LORD"
    assert (words, masked) == (1, expected) and not recwarn.list


@pytest.mark.parametrize("argv, message", [
    (["-n", "0"], "error: -n 0: must be >= 1"),
    (["--max-tokens", "0"], "error: --max-tokens 0: must be >= 1"),
    (["--temperature", "-0.5"], "error: --temperature -0.5: must be >= 0 (0 is greedy)"),
    (["--top-k", "-1"], "error: --top-k -1: must be >= 0 (0: no cut)"),
    (["--prompt", ""], "error: --prompt is empty"),
    (["--device", "tpu"], "error: --device tpu: not a device here"),
])
def test_bad_input_is_one_line(tiny_runs, capsys, argv, message):
    assert sample.main(["--checkpoint", str(tiny_runs["tied"]), "--prompt", "Therefore", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(message) and captured.err.count("\n") == 1


def test_a_missing_run_is_one_line(tmp_path, capsys):
    assert sample.main(["--checkpoint", str(tmp_path / "nowhere"), "--prompt", "Therefore"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'}: checkpoint not found\n"
