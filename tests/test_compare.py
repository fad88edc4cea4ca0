"""Tests for genesis/compare.py: the statistics on known answers, and the runner's skip / resume behaviour on a tiny
config (two 5-step runs of a 2-layer model, 8 cloze items)."""

import json
import math
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from genesis import compare
from genesis.evaluate import checkpoint_identity

from .helpers import ROOT

TINY = ["--set", "model.n_layers=2", "--set", "model.dim=64", "--set", "model.n_heads=2", "--set", "model.ffn_dim=128",
        "--set", "model.seq_len=64", "--set", "training.micro_batch=4", "--set", "training.eval_every=0",
        "--set", "training.log_every=5", "--set", "training.warmup_steps=2", "--set", "training.checkpoint_every=0",
        # 1 chapter in 200 held out (~2,500 tokens, ~60 connectives): every evaluation is ~20x shorter than on the
        # default split, and the runs' own tokenizer is trained once per test session
        "--set", "data.heldout_every=200"]


def test_mean_ci_is_a_student_t_interval():
    m, lo, hi = compare.mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert m - lo == pytest.approx(hi - m)
    assert compare.mean_ci([0.4]) == (0.4, 0.4, 0.4)
    assert compare.mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)


def test_bootstrap_of_a_strategy_identical_to_the_baseline_contains_zero():
    rng = np.random.default_rng(1)
    baseline = (rng.random((2, 300)) < 0.4).astype(float)
    result = compare.paired_bootstrap(baseline.copy(), baseline, samples=1000)
    assert result.diff == 0.0 and result.diff_ci[0] <= 0.0 <= result.diff_ci[1]
    assert result.relative_ci[0] <= 0.0 <= result.relative_ci[1]
    assert result.decision == "do not proceed"  # +0% is surely below +5%


def test_bootstrap_of_unrelated_noise_contains_zero_and_is_inconclusive():
    rng = np.random.default_rng(2)
    baseline = (rng.random((3, 200)) < 0.4).astype(float)
    strategy = (rng.random((3, 200)) < 0.4).astype(float)
    result = compare.paired_bootstrap(strategy, baseline, samples=2000)
    assert result.diff_ci[0] < 0.0 < result.diff_ci[1]
    assert result.decision == "inconclusive"


def test_bootstrap_of_a_clear_improvement_says_proceed():
    rng = np.random.default_rng(3)
    baseline = (rng.random((2, 400)) < 0.3).astype(float)
    strategy = np.maximum(baseline, (rng.random((2, 400)) < 0.3))  # right wherever the baseline is, and more
    result = compare.paired_bootstrap(strategy, baseline, samples=2000)
    assert result.diff_ci[0] > 0.1 and result.relative_ci[0] > compare.PROCEED_AT
    assert result.decision == "proceed"
    assert result.seeds_relative_ci[0] > 0.0


def test_the_decision_reads_the_five_percent_margin_not_the_difference():
    """A sure +2% relative gain (its difference interval well above 0) is below the design notes' +5% bar: do not
    proceed; a sure +10% clears it. With threshold 0 the same +2% proceeds, so the threshold is what decides."""
    rng = np.random.default_rng(4)
    baseline = (rng.random((1, 20000)) < 0.5).astype(float)
    for extra, decision in ((0.01, "do not proceed"), (0.05, "proceed")):  # +2% and +10% of a 0.5 accuracy
        strategy = np.maximum(baseline, rng.random((1, 20000)) < extra / 0.5 * (1 - baseline))
        result = compare.paired_bootstrap(strategy, baseline, samples=1000)
        assert result.diff_ci[0] > 0.005, extra  # surely better than the baseline, either way
        assert result.relative == pytest.approx(2 * extra, abs=0.01) and result.decision == decision, extra
        if extra == 0.01:
            assert compare.paired_bootstrap(strategy, baseline, samples=1000, threshold=0.0).decision == "proceed"


def test_breakdown_cells_show_the_mean_and_t_interval_over_seeds():
    def result(by_class: dict[str, float]) -> dict:
        groups = {g: {"accuracy": a, "n": 10} for g, a in by_class.items()}
        return {"cloze": {"scorers": {"model_verse": {"breakdowns": {"class": groups}}}}}

    seeds = [result({"causal": 0.4, "temporal": 0.0}), result({"causal": 0.5, "temporal": 0.0}),
             result({"causal": 0.6, "temporal": 0.3})]
    # 0.5 +- 4.303 x 0.1 / sqrt(3) = 0.5 +- 0.2484
    assert compare.breakdown_cell(seeds, "class", "causal") == "50.0 [25.2, 74.8]"
    # 0.1 +- 4.303 x 0.1732 / sqrt(3) = 0.1 +- 0.4303: clipped at 0
    assert compare.breakdown_cell(seeds, "class", "temporal") == "10.0 [0.0, 53.0]"
    assert compare.breakdown_cell(seeds[:1], "class", "causal") == "40.0"  # one seed: no interval
    assert compare.breakdown_cell([*seeds, result({"temporal": 0.1})], "class", "causal") == "n/a"


def test_report_figures_are_written_beside_the_report_and_linked(tmp_path):
    """Two strategies x two seeds: strategy_metrics.png and learning_curves.png (from each run's metrics.jsonl)
    land in the report's folder, and the Markdown section links them by name."""
    runs, trained, evaluated = [], {}, {}
    for k, (strategy, seed) in enumerate([(s, seed) for s in ("none", "weighted") for seed in (1, 2)]):
        spec = compare.RunSpec(strategy, seed, [], tmp_path / "runs" / f"{strategy}-seed{seed}")
        spec.run_dir.mkdir(parents=True)
        (spec.run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"kind": "train", "step": step, "loss": 9 - step / 10 - k / 20}) + "\n" for step in (5, 10))
            + json.dumps({"kind": "eval", "step": 10, "heldout_loss": 8.0 - k / 10}) + "\n")
        scorers = {name: {"accuracy": 0.1 + k / 50} for name in ("model_verse", "model_suffix")}
        scorers.update(kn3_verse={"accuracy": 0.2}, kn3_suffix={"accuracy": 0.15}, majority={"accuracy": 0.3})
        evaluated[spec.name] = {"next_token": {"accuracy": 0.01 * k, "mean_logprob": -5 - k / 10},
                                "cloze": {"scorers": scorers}}
        trained[spec.name] = {"summary": {"last_heldout_loss": 8.0 - k / 10}}
        runs.append(spec)
    section = compare.write_report_figures(runs, trained, evaluated, tmp_path / "report")
    for name in ("strategy_metrics", "learning_curves"):
        png = tmp_path / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"]({name}.png)" in section
    named = compare.write_report_figures(runs, trained, evaluated, tmp_path / "docs", prefix="compare-x-")
    assert "](compare-x-strategy_metrics.png)" in named
    assert (tmp_path / "docs" / "compare-x-learning_curves.png").is_file()
    assert section.startswith("\n## Figures\n")


def test_ctrl_c_during_an_evaluation_exits_130_without_aborting(tmp_path):
    """The evaluation runs in a thread: Ctrl-C while it scores leaves at once with status 130 and the usual line.
    Regression: the interpreter was torn down under the running thread, and torch aborted the process
    ("terminate called without an active exception", status -6)."""
    out, err = tmp_path / "cmp", tmp_path / "stderr.txt"
    argv = [sys.executable, "-m", "genesis.compare", "--strategies", "none", "--seeds", "1", "--steps", "5",
            "--max-items", "0", "--bootstrap", "100", "--out", str(out), *TINY]
    with open(err, "w") as stderr:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        deadline = time.time() + 600
        while "next-token:" not in err.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)  # the model is scoring the held-out stream: native code in the thread
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    text = err.read_text()
    assert code == 130 and "terminate called" not in text, (code, text[-1000:])
    assert text.rstrip().endswith("interrupted (SIGINT): finished runs are kept; rerun the same command to continue")
    assert (out / "runs" / "none-seed1" / "train.done").is_file()
    assert not (out / "runs" / "none-seed1" / "eval.json").exists()


def test_unknown_strategy_and_bad_seeds_are_one_line_errors(capsys, tmp_path):
    assert compare.main(["--strategies", "none,nosuch", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: --strategies: unknown nosuch (known: none, uniform, weighted, " \
                                              "structural, structural_head, chain, adaptive)"
    assert compare.main(["--seeds", "1,x", "--out", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_runner_resumes_after_an_interrupt_and_skips_finished_runs(tmp_path, monkeypatch, capsys):
    # a second strategy with the same settings as the baseline: its runs must come out identical, so the paired
    # bootstrap's interval is exactly [0, 0] and the decision is "do not proceed"
    monkeypatch.setitem(compare.STRATEGIES, "same", ("masking.enabled=false",))
    out = tmp_path / "cmp"
    argv = ["--strategies", "none,same", "--seeds", "1", "--steps", "5", "--max-items", "8", "--bootstrap", "200",
            "--out", str(out), *TINY]
    real_command = compare.train_command

    def interrupted(spec, resume):  # same-seed1's training process stops before saving anything, as on a Ctrl-C
        if spec.name == "same-seed1":
            return [sys.executable, "-c", "raise SystemExit(130)"]
        return real_command(spec, resume)

    monkeypatch.setattr(compare, "train_command", interrupted)
    assert compare.main(argv) == 1
    first = capsys.readouterr()
    assert "[1/2] none-seed1: training (" in first.out and "same-seed1: training failed (exit status 130)" in first.err
    assert "rerun the same command" in first.err
    done = out / "runs" / "none-seed1"
    assert (done / "train.done").is_file() and (done / "eval.json").is_file()
    assert not (out / "runs" / "same-seed1" / "train.done").exists()
    assert "- **incomplete**: left out same-seed1" in (out / "report.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (done / "train.done", done / "eval.json", done / "checkpoint.pt")}

    monkeypatch.setattr(compare, "train_command", real_command)
    assert compare.main(argv) == 0
    second = capsys.readouterr().out
    assert "[1/2] none-seed1: training done, skipping" in second
    assert "[1/2] none-seed1: evaluation done, skipping" in second
    assert "[2/2] same-seed1: training (" in second and "[2/2] same-seed1: evaluating" in second
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    report = (out / "report.md").read_text()
    assert "python -m genesis.compare --strategies none,same" in report and "incomplete" not in report
    row = next(line for line in report.splitlines() if line.startswith("| same |") and "+0.0 [" in line)
    assert "+0.0 [+0.0, +0.0]" in row and "**not informative at this scale**" in row  # 5 steps: below the trigram
    a = json.loads((done / "eval.json").read_text())["items"]["cloze"]
    b = json.loads((out / "runs" / "same-seed1" / "eval.json").read_text())["items"]["cloze"]
    assert a == b and len(a) > 0

    # a run that lost its marker after finishing resumes from its checkpoint instead of starting over
    (out / "runs" / "same-seed1" / "train.done").unlink()
    assert compare.main(argv) == 0
    third = capsys.readouterr().out
    assert "[2/2] same-seed1: resuming training" in third
    assert "resumed from" in (out / "runs" / "same-seed1" / "train.log").read_text()
    report = (out / "report.md").read_text()  # its time is that of the last segment, and the report says so
    assert re.search(r"^\| same-seed1 \| 5 \|.*\| \d+\* \| \d+ \|$", report, re.M) and "\\* resumed after an" in report
    assert re.search(r"^\| none-seed1 \| 5 \|.*\| \d+ \| \d+ \|$", report, re.M)

    assert "[2/2] same-seed1: evaluation done, skipping" in third
    assert "[1/2] none-seed1: training done, skipping" in third

    # an eval.json belongs to the checkpoint it measured: one rewritten since is evaluated again
    same = out / "runs" / "same-seed1"
    before = json.loads((same / "eval.json").read_text())
    assert before["checkpoint_identity"] == checkpoint_identity(same / "checkpoint.pt")
    ckpt = torch.load(same / "checkpoint.pt", weights_only=True)
    ckpt["model"] = {name: weight + 0.05 for name, weight in ckpt["model"].items()}  # same step, other weights
    torch.save(ckpt, same / "checkpoint.pt")
    assert compare.main(argv) == 0
    fourth = capsys.readouterr().out
    assert "[2/2] same-seed1: evaluating" in fourth and "[1/2] none-seed1: evaluation done, skipping" in fourth
    after = json.loads((same / "eval.json").read_text())
    assert after["checkpoint_identity"] == checkpoint_identity(same / "checkpoint.pt") != before["checkpoint_identity"]
    assert after["checkpoint_identity"]["step"] == before["checkpoint_identity"]["step"] == 5
    assert after["items"]["next_token"] != before["items"]["next_token"]  # the new weights were measured
    # an eval.json that records no checkpoint (written before identities were) is not trusted either
    stale = json.loads((done / "eval.json").read_text())
    del stale["checkpoint_identity"]
    (done / "eval.json").write_text(json.dumps(stale))
    assert compare.main(argv) == 0
    fifth = capsys.readouterr().out
    assert "[1/2] none-seed1: evaluating" in fifth and "[2/2] same-seed1: evaluation done, skipping" in fifth
    assert "## Cloze accuracy by class and position" in (out / "report.md").read_text()

    # a finished run whose checkpoint was deleted is trained again; the same seed gives the same weights, so its
    # eval.json (which names the weights it measured) still answers
    (done / "checkpoint.pt").unlink()
    assert compare.main(argv) == 0
    sixth = capsys.readouterr().out
    assert "[1/2] none-seed1: training was done but checkpoint.pt is gone: training again" in sixth
    assert "[1/2] none-seed1: evaluation done, skipping" in sixth and (done / "checkpoint.pt").is_file()
    assert json.loads((done / "eval.json").read_text())["checkpoint_identity"] == checkpoint_identity(done)

    # a bad --device fails before any training, naming the option
    assert compare.main([*argv, "--device", "tpu"]) == 2
    assert capsys.readouterr().err.startswith("error: --device tpu: not a device here")

    # the same directory with other settings is refused, not silently reused
    assert compare.main([*argv[:5], "6", *argv[6:]]) == 2
    assert "holds a run with other settings" in capsys.readouterr().err

    # a run recorded by an older Genesis — its run.json has no config, and the config in its checkpoint lacks a key
    # added since — is the same run when every key it has agrees and the missing one has its default: reused
    info = json.loads((done / "run.json").read_text())
    (done / "run.json").write_text(json.dumps({k: v for k, v in info.items() if k != "config"} | {"fingerprint": "0"}))
    ckpt = torch.load(done / "checkpoint.pt", weights_only=True)
    del ckpt["config"]["masking"]["schedule"], ckpt["config"]["model"]["class_head"]
    torch.save(ckpt, done / "checkpoint.pt")
    assert compare.main(argv) == 0
    seventh = capsys.readouterr().out
    assert "[1/2] none-seed1: training done, skipping" in seventh
    assert json.loads((done / "run.json").read_text())["fingerprint"] == info["fingerprint"]  # recorded again
    # but not when a key it has differs
    (done / "run.json").write_text(json.dumps({k: v for k, v in info.items() if k != "config"} | {"fingerprint": "0"}))
    ckpt["config"]["model"]["dim"] = 32
    torch.save(ckpt, done / "checkpoint.pt")
    assert compare.main(argv) == 2
    assert "none-seed1: holds a run with other settings" in capsys.readouterr().err
    # damaged records are one-line errors that say so, never a traceback or a silent reuse
    for record, needle in ((info | {"fingerprint": "0", "config": "model masking"},
                            "run.json: its recorded config is not a table"),
                           ([1], "run.json: not a run record (damaged?)"),
                           ({"fingerprint": "0"}, "holds a run whose settings cannot be read")):
        (done / "run.json").write_text(json.dumps(record))
        if needle.startswith("holds"):
            (done / "checkpoint.pt").write_text("not a checkpoint")
        assert compare.main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def _fake_eval(model: np.ndarray, trigram: np.ndarray) -> dict:
    """An eval.json-shaped result with these per-item whole-verse credits (the model's and the trigram's)."""
    def scorer(credits: np.ndarray) -> dict:
        return {"accuracy": float(credits.mean()), "breakdowns": {"class": {"causal": {"accuracy": 0.5, "n": 1}},
                                                                  "position": {"inside": {"accuracy": 0.5, "n": 1}},
                                                                  "word": {"therefore": {"accuracy": 0.8, "n": 40},
                                                                           "but": {"accuracy": 0.6, "n": 90}}}}
    items = [{"id": f"item{i}", "credit": {"model_verse": float(m), "kn3_verse": float(t)}}
             for i, (m, t) in enumerate(zip(model, trigram))]
    return {"corpus": "kjv", "split": "heldout", "device": "cpu",
            "next_token": {"accuracy": 0.1, "mean_logprob": -3.0, "n": 10,
                           "breakdowns": {"word": {"therefore": {"accuracy": 0.1, "n": 40}}}},
            "masked_context": {"k": 8, "n": 10, "visible_loss": 4.0, "masked_loss": 4.5, "gap": 0.5},
            "cloze": {"n_candidates": 14, "scorers": {"model_verse": scorer(model), "model_suffix": scorer(model),
                                                      "kn3_verse": scorer(trigram), "kn3_suffix": scorer(trigram),
                                                      "majority": scorer(trigram),
                                                      "positional_majority": scorer(trigram)}},
            "items": {"cloze": items}}


def _fake_report(tmp_path, baseline_accuracy: float) -> str:
    """The report of none vs a strategy that is right wherever the baseline is and on 40% more items, 3 seeds, 400
    items; the trigram is right on the first 60%."""
    rng = np.random.default_rng(5)
    trigram = (np.arange(400) < 240).astype(float)
    args = compare.parse_args(["--strategies", "none,weighted", "--out", str(tmp_path), "--bootstrap", "500"])
    runs = compare.plan_runs(args)
    trained, evaluated = {}, {}
    for r in runs:
        base = (rng.random(400) < baseline_accuracy).astype(float)
        credits = base if r.strategy == "none" else np.maximum(base, rng.random(400) < 0.4)
        evaluated[r.name] = _fake_eval(credits, trigram)
        trained[r.name] = {"summary": {"steps": 5, "last_heldout_loss": 4.0}, "train_s": 1}
    return compare.build_report(runs, trained, evaluated, args, "python -m genesis.compare", 1.0)


def test_a_baseline_below_the_trigram_makes_the_report_not_informative(tmp_path):
    report = _fake_report(tmp_path, 0.45)
    assert "**not informative at this scale**: the interval does not lie above 0" in report
    assert "Scale up: more training steps" in report
    row = next(line for line in report.splitlines() if line.startswith("| weighted |") and "scale" in line)
    assert row.endswith("| **not informative at this scale** |")
    assert "| not met (not informative at this scale) |" in report  # not a success either
    assert report.index("## Informative?") < report.index("## Decision")
    assert "| loss after connectives, visible | … masked | … gap |" in report
    assert "| 4.000 | 4.500 | 0.500 |" in report


def test_a_baseline_above_the_trigram_decides_as_before(tmp_path):
    report = _fake_report(tmp_path, 0.8)
    assert "**informative**: the interval lies above 0" in report and "not informative" not in report
    row = next(line for line in report.splitlines() if line.startswith("| weighted |") and "proceed" in line)
    assert row.endswith("| **proceed** |")
    criteria = report.split("## The design notes' success criteria")[1].split("\n## ")[0]
    assert "> 75% accuracy on *therefore*, > 85% on *but*" in criteria
    rows = [line for line in criteria.splitlines() if line.startswith(("| none |", "| weighted |"))]
    assert rows == [  # next-token "but" is absent from the fake evaluation: n/a, not a number
        "| none | 10.0 (n=40) not met | n/a | 80.0 (n=40) met | 60.0 (n=90) not met | -20.0 not met | (the baseline) |",
        "| weighted | 10.0 (n=40) not met | n/a | 80.0 (n=40) met | 60.0 (n=90) not met | -20.0 not met "
        "| met (proceed) |"]


def test_the_scale_check_is_a_paired_interval_of_baseline_minus_trigram():
    trigram = np.tile((np.arange(300) < 180).astype(float), (2, 1))
    assert compare.informative_scale(trigram.copy(), trigram, 500).diff_ci == (0.0, 0.0)  # equal: not above 0
    assert not compare.informative_scale(trigram.copy(), trigram, 500).informative
    better = trigram.copy()
    better[:, 180:240] = 1.0  # right wherever the trigram is, and on 20% more items
    check = compare.informative_scale(better, trigram, 500)
    assert check.informative and check.diff_ci[0] > 0.1 and check.baseline - check.trigram == pytest.approx(0.2)


def _outcomes(run_dir) -> dict:
    """What a run produced: its evaluation's per-item results and its final held-out loss."""
    evaluation = json.loads((run_dir / "eval.json").read_text())
    return {"cloze": evaluation["items"]["cloze"], "next_token": evaluation["next_token"],
            "loss": json.loads((run_dir / "train.done").read_text())["summary"]["last_heldout_loss"]}


def test_two_jobs_give_the_same_runs_as_one(tmp_path, capsys):
    common = ["--strategies", "none,weighted", "--seeds", "1", "--steps", "4", "--max-items", "6", "--bootstrap",
              "200", *TINY]
    assert compare.main([*common, "--out", str(tmp_path / "one")]) == 0
    assert compare.main([*common, "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 runs (none-seed1, weighted-seed1) in " + str(tmp_path / "two") + ", 2 at a time" in out
    assert f"log {tmp_path / 'two' / 'runs' / 'weighted-seed1' / 'train.log'})" in out
    for name in ("none-seed1", "weighted-seed1"):
        one, two = _outcomes(tmp_path / "one" / "runs" / name), _outcomes(tmp_path / "two" / "runs" / name)
        assert len(one["cloze"]) > 0
        _assert_same_outcomes(one, two, name)


# Runs under --jobs 2 get one torch thread each, under --jobs 1 all cores: float reductions add in another order, so
# on some CPUs (an AVX-512 Xeon) a mean log p differs in its 8th digit. Floats (losses, log p, credits, which are
# rounded to 6 digits) are compared to this relative tolerance; everything discrete (ids, words, picks, counts)
# exactly.
FLOAT_RTOL = 1e-6


def _assert_same_outcomes(one, two, where: str) -> None:
    if isinstance(one, float) or isinstance(two, float):
        assert isinstance(one, (int, float)) and isinstance(two, (int, float)), where
        assert math.isclose(one, two, rel_tol=FLOAT_RTOL, abs_tol=1e-6) or (math.isnan(one) and math.isnan(two)), \
            f"{where}: {one!r} vs {two!r}"
    elif isinstance(one, dict):
        assert isinstance(two, dict) and one.keys() == two.keys(), where
        for key in one:
            _assert_same_outcomes(one[key], two[key], f"{where}.{key}")
    elif isinstance(one, list):
        assert isinstance(two, list) and len(one) == len(two), where
        for i, (a, b) in enumerate(zip(one, two)):
            _assert_same_outcomes(a, b, f"{where}[{i}]")
    else:
        assert one == two, f"{where}: {one!r} vs {two!r}"  # discrete: words, picks, ids, counts, flags


def test_outcomes_compare_floats_to_a_tolerance_and_picks_exactly():
    base = {"cloze": [{"id": "Romans 5:1@0", "predicted": {"model_verse": "therefore"}, "credit": {"m": 1.0}}],
            "next_token": {"mean_logprob": -8.776946518, "n": 60}, "loss": 4.5}
    drift = json.loads(json.dumps(base))
    drift["next_token"]["mean_logprob"] = -8.776946584  # the AVX-512 machine's two-job value
    _assert_same_outcomes(base, drift, "run")
    for path, value in ((("next_token", "mean_logprob"), -8.7769), (("next_token", "n"), 61), (("loss",), 4.6)):
        changed = json.loads(json.dumps(base))
        target = changed
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(AssertionError):
            _assert_same_outcomes(base, changed, "run")
    changed = json.loads(json.dumps(base))
    changed["cloze"][0]["predicted"]["model_verse"] = "wherefore"  # a different pick is never within tolerance
    with pytest.raises(AssertionError):
        _assert_same_outcomes(base, changed, "run")


def test_a_failed_run_is_reported_while_the_others_finish(tmp_path, monkeypatch, capsys):
    # a corpus file that does not exist passes the config checks and fails in the training process
    monkeypatch.setitem(compare.STRATEGIES, "broken", ("data.corpus=/nonexistent/bible.txt",))
    out = tmp_path / "cmp"
    argv = ["--strategies", "none,broken", "--seeds", "1", "--steps", "4", "--max-items", "6", "--bootstrap", "200",
            "--jobs", "2", "--out", str(out), *TINY]
    assert compare.main(argv) == 1
    captured = capsys.readouterr()
    assert "[2/2] broken-seed1: training failed (exit status 2); the last lines of " in captured.err
    assert "/nonexistent/bible.txt" in captured.err  # the tail of its train.log
    assert "error: 1 run(s) failed: broken-seed1" in captured.err
    assert (out / "runs" / "none-seed1" / "eval.json").is_file()
    report = (out / "report.md").read_text()
    assert "- **incomplete**: left out broken-seed1" in report and "| none |" in report


def test_a_job_slot_is_filled_while_a_run_is_evaluated(tmp_path, monkeypatch):
    """With one job slot, the second run's training starts while the first run is evaluated (the evaluation waits
    for it here: before evaluations ran in a thread, this deadlocked into the timeout)."""
    args = compare.parse_args(["--strategies", "none", "--seeds", "1,2", "--out", str(tmp_path), "--jobs", "1",
                               *TINY])
    runs = compare.plan_runs(args)
    started, second_started = [], threading.Event()

    def fake_start(spec, cfg, head, slot, jobs):
        started.append(spec.name)
        if len(started) == 2:
            second_started.set()
        process = subprocess.Popen([sys.executable, "-c", "pass"])
        return compare.Training(spec, head, slot, False, process, None, time.time())

    def fake_evaluate(spec, args, ctx):
        if spec.name == "none-seed1":
            assert second_started.wait(timeout=30), "the free slot stayed empty during the evaluation"
        return {"run": spec.name}, ctx

    monkeypatch.setattr(compare, "start_training", fake_start)
    monkeypatch.setattr(compare, "finish_training", lambda job: {"train_s": 0.0})
    monkeypatch.setattr(compare, "evaluate_run", fake_evaluate)
    trained, evaluated, failed = compare.run_all(runs, args, time.time())
    assert started == ["none-seed1", "none-seed2"] and not failed
    assert evaluated == {"none-seed1": {"run": "none-seed1"}, "none-seed2": {"run": "none-seed2"}}
