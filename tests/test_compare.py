"""Tests for genesis/compare/: the statistics on known answers, and the runner's skip / resume behaviour on a tiny
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
from genesis.compare import cells, jobs
from genesis.compare.report import rates_section
from genesis.evaluate import checkpoint_identity

from .helpers import ROOT

TINY = ["--set", "model.n_layers=2", "--set", "model.dim=64", "--set", "model.n_heads=2", "--set", "model.ffn_dim=128",
        "--set", "model.seq_len=64", "--set", "training.micro_batch=4", "--set", "training.eval_every=0",
        "--set", "training.log_every=5", "--set", "training.warmup_steps=2", "--set", "training.checkpoint_every=0",
        # 1 chapter in 200 held out (~2,500 tokens, ~60 connectives): every evaluation is ~20x shorter than on the
        # default split, and the runs' own tokenizer is trained once per test session
        "--set", "data.heldout_every=200",
        # the frozen probe fitted on 300 training occurrences, not 8,000: ~15 s less per evaluation
        "--probe-max-train", "300"]


def _chapters(n: int, per: int = 10) -> list[str]:
    """Each of n items' chapter, `per` items to a chapter."""
    return [f"Book {i // per + 1}" for i in range(n)]


def test_mean_ci_is_a_student_t_interval():
    m, lo, hi = compare.mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert m - lo == pytest.approx(hi - m)
    assert compare.mean_ci([0.4]) == (0.4, 0.4, 0.4)
    assert compare.mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)


def test_bootstrap_of_a_strategy_identical_to_the_baseline_contains_zero():
    rng = np.random.default_rng(1)
    baseline = (rng.random((2, 300)) < 0.4).astype(float)
    result = compare.paired_bootstrap(baseline.copy(), baseline, _chapters(300), samples=1000)
    assert result.diff == 0.0 and result.diff_ci[0] <= 0.0 <= result.diff_ci[1]
    assert result.relative_ci[0] <= 0.0 <= result.relative_ci[1]
    assert result.decision == "do not proceed"  # +0% is surely below +5%


def test_bootstrap_of_unrelated_noise_contains_zero_and_is_inconclusive():
    rng = np.random.default_rng(2)
    baseline = (rng.random((3, 200)) < 0.4).astype(float)
    strategy = (rng.random((3, 200)) < 0.4).astype(float)
    result = compare.paired_bootstrap(strategy, baseline, _chapters(200), samples=2000)
    assert result.diff_ci[0] < 0.0 < result.diff_ci[1]
    assert result.decision == "inconclusive"


def test_bootstrap_of_a_clear_improvement_says_proceed():
    rng = np.random.default_rng(3)
    baseline = (rng.random((2, 400)) < 0.3).astype(float)
    strategy = np.maximum(baseline, (rng.random((2, 400)) < 0.3))  # right wherever the baseline is, and more
    result = compare.paired_bootstrap(strategy, baseline, _chapters(400), samples=2000)
    assert result.diff_ci[0] > 0.1 and result.relative_ci[0] > compare.PROCEED_AT
    assert result.decision == "proceed"
    assert result.seeds_relative_ci[0] > 0.0


def test_the_decision_reads_the_five_percent_margin_not_the_difference():
    """A sure +2% relative gain (its difference interval well above 0) is below the design notes' +5% bar: do not
    proceed; a sure +10% clears it. With threshold 0 the same +2% proceeds, so the threshold is what decides."""
    rng = np.random.default_rng(4)
    baseline = (rng.random((1, 20000)) < 0.5).astype(float)
    units = _chapters(20000)
    for extra, decision in ((0.01, "do not proceed"), (0.05, "proceed")):  # +2% and +10% of a 0.5 accuracy
        strategy = np.maximum(baseline, rng.random((1, 20000)) < extra / 0.5 * (1 - baseline))
        result = compare.paired_bootstrap(strategy, baseline, units, samples=1000)
        assert result.diff_ci[0] > 0.005, extra  # surely better than the baseline, either way
        assert result.relative == pytest.approx(2 * extra, abs=0.01) and result.decision == decision, extra
        if extra == 0.01:
            without = compare.paired_bootstrap(strategy, baseline, units, samples=1000, threshold=0.0)
            assert without.decision == "proceed"


def test_an_item_id_names_its_chapter():
    assert compare.chapter_of("Romans 5:1@0") == "Romans 5"
    assert compare.chapter_of("1 Samuel 3:4@10") == "1 Samuel 3"
    assert compare.chapter_of("Song of Solomon 2:12@31") == "Song of Solomon 2"
    with pytest.raises(compare.CompareError, match=r"item id 'item7': expected 'Book chapter:verse@offset'"):
        compare.chapter_of("item7")


def test_items_correlated_within_chapters_widen_the_chapter_interval():
    """40 chapters of 25 items whose difference is mostly the chapter's own: resampling items as if independent
    gives a far narrower interval than resampling chapters, the unit the items really vary by."""
    rng = np.random.default_rng(8)
    chapter_effect = np.repeat(rng.normal(0.0, 1.0, 40), 25)
    strategy = (chapter_effect + rng.normal(0.0, 0.1, 1000))[None, :]
    baseline = np.zeros_like(strategy)
    chapters = _chapters(1000, per=25)
    items = [f"{c}:{i}@0" for i, c in enumerate(chapters)]  # every item its own unit: item-level resampling
    by_chapter = compare.paired_bootstrap(strategy, baseline, chapters, samples=2000, threshold=0.0)
    by_item = compare.paired_bootstrap(strategy, baseline, items, samples=2000, threshold=0.0)
    width = {name: r.diff_ci[1] - r.diff_ci[0] for name, r in (("chapter", by_chapter), ("item", by_item))}
    assert by_chapter.units == 40 and by_item.units == 1000
    assert by_chapter.diff == by_item.diff
    assert width["chapter"] > 3 * width["item"], width  # ~sqrt(25) = 5 for a pure chapter effect


def test_a_resample_takes_whole_chapters_the_same_for_both_arms():
    counts, unit = compare.resample_counts(["b", "a", "b", "c"], 500, np.random.default_rng(0))
    assert counts.shape == (500, 3) and (counts.sum(axis=1) == 3).all()  # as many chapters drawn as there are
    assert unit.tolist() == [1, 0, 1, 2]
    # one chapter always all right in the strategy and all wrong in the baseline, the other equal: every resample's
    # difference is the share of items drawn from the first chapter, never a mix of arms from different draws
    strategy = np.array([[1.0, 1.0, 0.5, 0.5]])
    baseline = np.array([[0.0, 0.0, 0.5, 0.5]])
    draws = compare.paired_draws(strategy, baseline, ["x", "x", "y", "y"], samples=400)
    assert set(np.round(draws.means[0] - draws.means[1], 6)) == {0.0, 0.5, 1.0}


def test_holm_adjusts_known_p_values_and_sets_each_rank_its_level():
    p = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}
    adjusted = compare.holm_adjust(p)
    # ranks d, a, c, b: 4 x 0.005, max(., 3 x 0.01), max(., 2 x 0.03), max(., 1 x 0.04)
    assert list(sorted(adjusted, key=adjusted.get)) == ["d", "a", "c", "b"]
    assert adjusted == pytest.approx({"d": 0.02, "a": 0.03, "c": 0.06, "b": 0.06})
    levels = compare.holm_alphas(p)
    # d and a are rejected at 0.05/4 and 0.05/3; c is not at 0.05/2, so b (which 0.05/1 would reject) keeps 0.05/2
    assert levels == pytest.approx({"d": 0.0125, "a": 0.05 / 3, "c": 0.025, "b": 0.025})
    assert compare.holm_adjust({"only": 0.03}) == {"only": 0.03} and compare.holm_alphas({"only": 0.03}) == {
        "only": 0.05}


def test_the_decision_reads_the_holm_corrected_interval():
    """A +6.5% gain (p about 0.03 against the +5% bar): proceed when it is the only strategy tested; with four
    strategies like it, Holm's first level is 0.05/4, and the corrected interval straddles the bar: inconclusive."""
    rng = np.random.default_rng(7)
    baseline = (rng.random((3, 600)) < 0.5).astype(float)
    strategy = np.maximum(baseline, np.random.default_rng(11).random((3, 600)) < 0.065)
    units = _chapters(600)
    alone = compare.paired_bootstrap(strategy, baseline, units)
    assert alone.decision == "proceed" and alone.alpha == 0.05 and 0.0125 < alone.p < 0.05
    assert compare.holm_tests({"weighted": strategy}, baseline, units)["weighted"].decision == "proceed"
    four = compare.holm_tests({name: strategy for name in ("a", "b", "c", "d")}, baseline, units)
    for res in four.values():
        assert res.decision == "inconclusive" and res.alpha == 0.0125 and res.p_holm > 0.05
        assert res.diff_ci[0] < alone.diff_ci[0] and res.diff_ci[1] > alone.diff_ci[1]  # the wider, corrected one


def test_the_seed_paired_interval_is_a_t_interval_over_per_seed_differences():
    strategy = np.array([[0.5] * 4, [0.6] * 4, [0.7] * 4])  # per seed: 0.5, 0.6, 0.7
    baseline = np.array([[0.4] * 4, [0.4] * 4, [0.5] * 4])  # per seed: 0.4, 0.4, 0.5 -> differences .1, .2, .2
    res = compare.paired_bootstrap(strategy, baseline, ["A 1", "A 1", "A 2", "A 2"], samples=200)
    mean, low, high = res.seed_diff
    half = 4.303 * np.std([0.1, 0.2, 0.2], ddof=1) / math.sqrt(3)
    assert mean == pytest.approx(0.5 / 3) and (low, high) == pytest.approx((mean - half, mean + half))
    assert (res.seeds_positive, res.seeds) == (3, 3)
    assert cells.seed_cell(res) == f"+16.7 [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}], 3/3 > 0"


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
        model = (np.arange(50) < 5 + k).astype(float)
        evaluated[spec.name] = _fake_eval(model, (np.arange(50) < 10).astype(float))
        trained[spec.name] = {"summary": {"last_heldout_loss": 8.0 - k / 10}}
        runs.append(spec)
    data = compare.ReportData(runs, trained, evaluated)
    assert data.values(compare.METRICS[2], "weighted", "all") == [0.14, 0.16]  # the table's and the figure's numbers
    section = compare.write_report_figures(data, tmp_path / "report")
    for name in ("strategy_metrics", "learning_curves"):
        png = tmp_path / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"]({name}.png)" in section
    named = compare.write_report_figures(data, tmp_path / "docs", prefix="compare-x-")
    assert "](compare-x-strategy_metrics.png)" in named
    assert (tmp_path / "docs" / "compare-x-learning_curves.png").is_file()
    assert section.startswith("\n## Figures\n")


def _end_only_runs(tmp_path, train_steps: tuple[int, ...]) -> compare.ReportData:
    """Two strategies x two seeds that evaluate once, at the end, with a next-token accuracy of 0 everywhere (a short
    CPU run); each logs the training loss at `train_steps`."""
    runs, trained, evaluated = [], {}, {}
    for k, (strategy, seed) in enumerate([(s, seed) for s in ("none", "weighted") for seed in (1, 2)]):
        spec = compare.RunSpec(strategy, seed, [], tmp_path / "runs" / f"{strategy}-seed{seed}")
        spec.run_dir.mkdir(parents=True)
        (spec.run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"kind": "train", "step": step, "loss": 9 - step / 10 - k / 20}) + "\n" for step in train_steps)
            + json.dumps({"kind": "eval", "step": 10, "heldout_loss": 8.0 - k / 10, "heldout_connective_accuracy": 0.0,
                          "heldout_connective_logprob": -4.0 - k / 10}) + "\n")
        evaluated[spec.name] = _fake_eval((np.arange(50) < 5 + k).astype(float), (np.arange(50) < 10).astype(float))
        for item in evaluated[spec.name]["items"]["next_token"]:
            item["credit"] = 0.0
        trained[spec.name] = {"summary": {"last_heldout_loss": 8.0 - k / 10}}
        runs.append(spec)
    return compare.ReportData(runs, trained, evaluated)


def test_figures_leave_out_panels_without_data_and_curves_of_one_point(tmp_path):
    """A next-token accuracy of 0 in every run gets no panel (the others do, in a grid); metrics evaluated once per
    run are no curves: the learning-curve figure keeps the training loss, and the section says where the rest is."""
    data = _end_only_runs(tmp_path, (5, 10))
    shown = compare.figure_metrics(data, data.decision_set)
    assert [m.field for m in shown] == ["logprob", "model_verse", "model_suffix", "last_heldout_loss"]
    section = compare.write_report_figures(data, tmp_path / "report")
    assert "Left out, with nothing to show (no value, or an accuracy below 0.5% in every run): next-token " \
           "accuracy (%)." in section
    assert "learning curves, from their metrics.jsonl (`python -m genesis.plot`): training loss. Evaluated once per " \
           "run, so not curves: held-out loss, held-out connectives: next-token accuracy (%), held-out connectives: " \
           "mean log p (in the tables above)." in section
    for name in ("strategy_metrics", "learning_curves"):
        assert (tmp_path / "report" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name}.png)" in section


def test_runs_with_one_point_per_metric_get_no_learning_curves_and_an_older_figure_goes(tmp_path):
    data = _end_only_runs(tmp_path, (10,))
    stale = tmp_path / "report" / "learning_curves.png"
    stale.parent.mkdir()
    stale.write_bytes(b"an older report's figure")
    section = compare.write_report_figures(data, tmp_path / "report")
    assert not stale.exists() and "learning_curves.png" not in section
    assert "Every run has one point per metric in its metrics.jsonl (evaluated once, at the end): no learning " \
           "curves; the end-of-training values are in the tables above." in section
    assert (tmp_path / "report" / "strategy_metrics.png").is_file()


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
    assert capsys.readouterr().err.strip() == ("error: --strategies: unknown nosuch (known: none, uniform, weighted, "
                                               "structural, structural_head, readout, chain, adaptive, random)")
    assert compare.main(["--seeds", "1,x", "--out", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
    for flag, value, least in (("--probe-max-train", "-5", 0), ("--bootstrap", "50", 100), ("--jobs", "0", 1)):
        assert compare.main([flag, value, "--out", str(tmp_path)]) == 2
        assert capsys.readouterr().err.strip() == f"error: {flag}: must be >= {least} (got {value})"


def test_runner_resumes_after_an_interrupt_and_skips_finished_runs(tmp_path, monkeypatch, capsys):
    # a second strategy with the same settings as the baseline: its runs must come out identical, so the paired
    # bootstrap's interval is exactly [0, 0] and the decision is "do not proceed"
    monkeypatch.setitem(compare.STRATEGIES, "same", ("masking.enabled=false",))
    out = tmp_path / "cmp"
    argv = ["--strategies", "none,same", "--seeds", "1", "--steps", "5", "--max-items", "8", "--bootstrap", "200",
            "--out", str(out), *TINY]
    real_command = jobs.train_command

    def interrupted(spec, resume):  # same-seed1's training process stops before saving anything, as on a Ctrl-C
        if spec.name == "same-seed1":
            return [sys.executable, "-c", "raise SystemExit(130)"]
        return real_command(spec, resume)

    monkeypatch.setattr(jobs, "train_command", interrupted)
    assert compare.main(argv) == 1
    first = capsys.readouterr()
    assert "[1/2] none-seed1: training (" in first.out and "same-seed1: training failed (exit status 130)" in first.err
    assert "rerun the same command" in first.err
    done = out / "runs" / "none-seed1"
    assert (done / "train.done").is_file() and (done / "eval.json").is_file()
    assert not (out / "runs" / "same-seed1" / "train.done").exists()
    assert "- **incomplete**: left out same-seed1" in (out / "report.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (done / "train.done", done / "eval.json", done / "checkpoint.pt")}

    monkeypatch.setattr(jobs, "train_command", real_command)
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
    # an eval.json of an older format (no conjunctive tags, no deletion variant) is evaluated again, and so is one
    # whose probe was fitted on another number of training occurrences than --probe-max-train asks
    older = json.loads((done / "eval.json").read_text())
    older["compare_settings"]["eval_format"] = compare.EVAL_FORMAT - 1
    (done / "eval.json").write_text(json.dumps(older))
    refitted = json.loads((same / "eval.json").read_text())
    assert refitted["link"]["probe"]["max_train"] == 300 and 0 < refitted["link"]["probe"]["n_train"] <= 300
    refitted["link"]["probe"]["max_train"] = 8000
    (same / "eval.json").write_text(json.dumps(refitted))
    assert compare.main(argv) == 0
    again = capsys.readouterr().out
    assert "[1/2] none-seed1: evaluating" in again and "[2/2] same-seed1: evaluating" in again
    assert "--probe-max-train 300 --bootstrap" in (out / "report.md").read_text()

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


def _fake_eval(model: np.ndarray, trigram: np.ndarray, conjunctive: np.ndarray | None = None,
               masked_context: dict | None = None, link: dict[str, np.ndarray] | None = None) -> dict:
    """An eval.json-shaped result with these per-item whole-verse credits (the model's and the trigram's), 8 items to
    a chapter; the next-token slots are the same items (log p falls with the model's credit); `conjunctive` tags
    them (None: untagged, as eval.json files were before the tag); `link` adds cloze scorers by name (link_probe,
    link_head) with their per-item credits."""
    def scorer(credits: np.ndarray) -> dict:
        return {"accuracy": float(credits.mean()), "breakdowns": {"class": {"causal": {"accuracy": 0.5, "n": 1}},
                                                                  "position": {"inside": {"accuracy": 0.5, "n": 1}},
                                                                  "word": {"therefore": {"accuracy": 0.8, "n": 40},
                                                                           "but": {"accuracy": 0.6, "n": 90}}}}
    ids = [f"1 Kings {i // 8 + 1}:{i % 8 + 1}@0" for i in range(len(model))]
    tags = [{} if conjunctive is None else {"conjunctive": bool(c)} for c in (conjunctive if conjunctive is not None
                                                                              else model)]
    link = link or {}
    cloze = [{"id": i, "credit": {"model_verse": float(m), "model_suffix": float(m), "kn3_verse": float(t),
                                  "kn3_suffix": float(t), "majority": float(t), "positional_majority": float(t),
                                  **{name: float(credits[k]) for name, credits in link.items()}}, **tag}
             for k, (i, m, t, tag) in enumerate(zip(ids, model, trigram, tags))]
    next_token = [{"id": i, "credit": float(m) / 10, "logprob": -3.0 - (1 - float(m)), **tag}
                  for i, m, tag in zip(ids, model, tags)]
    return {"corpus": "kjv", "split": "heldout", "device": "cpu",
            "next_token": {"accuracy": 0.1, "mean_logprob": -3.0, "n": 10,
                           "breakdowns": {"word": {"therefore": {"accuracy": 0.1, "n": 40}}}},
            "masked_context": masked_context or {"k": 8, "n": 10, "visible_loss": 4.0, "masked_loss": 4.5, "gap": 0.5},
            "cloze": {"n_candidates": 14, "scorers": {"model_verse": scorer(model), "model_suffix": scorer(model),
                                                      "kn3_verse": scorer(trigram), "kn3_suffix": scorer(trigram),
                                                      "majority": scorer(trigram),
                                                      "positional_majority": scorer(trigram),
                                                      **{name: scorer(credits) for name, credits in link.items()}}},
            "items": {"cloze": cloze, "next_token": next_token}}


def _fake_report(tmp_path, baseline_accuracy: float, tagged: bool = False, conjunctive_only: bool = False,
                 strategies: str = "none,weighted", masked_context=None) -> str:
    """The report of none vs a strategy that is right wherever the baseline is and on 40% more items (with
    conjunctive_only, on the conjunctive half only: every other item), 3 seeds, 400 items in 50 chapters; the
    trigram is right on the first 60%. masked_context(strategy, seed) gives a run's masked_context."""
    rng = np.random.default_rng(5)
    trigram = (np.arange(400) < 240).astype(float)
    conjunctive = np.arange(400) % 2 == 0
    args = compare.parse_args(["--strategies", strategies, "--out", str(tmp_path), "--bootstrap", "500"])
    runs = compare.plan_runs(args)
    trained, evaluated = {}, {}
    for r in runs:
        base = (rng.random(400) < baseline_accuracy).astype(float)
        better = (rng.random(400) < 0.4) & (conjunctive if conjunctive_only else True)
        credits = base if r.strategy == "none" else np.maximum(base, better)
        evaluated[r.name] = _fake_eval(credits, trigram, conjunctive if tagged else None,
                                       masked_context(r.strategy, r.seed) if masked_context else None)
        trained[r.name] = {"summary": {"steps": 5, "last_heldout_loss": 4.0}, "train_s": 1}
    data = compare.ReportData(runs, trained, evaluated)
    return compare.build_report(data, args, "python -m genesis.compare", 1.0)


def test_a_baseline_below_the_trigram_makes_the_report_not_informative(tmp_path):
    report = _fake_report(tmp_path, 0.45)
    assert "**not informative at this scale**: the interval does not lie above 0" in report
    assert "Scale up: more training steps" in report
    row = next(line for line in report.splitlines() if line.startswith("| weighted |") and "scale" in line)
    assert row.endswith("| **not informative at this scale** |")
    assert "| not met (not informative at this scale) |" in report  # not a success either
    assert report.index("## Informative?") < report.index("## Decision")
    masked = report.split("## Loss after connectives")[1].split("\n## ")[0]
    assert "| strategy | visible | masked | gap | gap - none's |" in masked
    assert "| weighted | 4.000 | 4.500 | 0.500 | 0.000, 0/3 > 0 |" in masked
    assert "No `random` runs in this comparison" in masked and "No deletion variant" in masked


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


def test_the_decision_reads_the_conjunctive_set_when_tagged_and_all_items_when_not(tmp_path):
    """The strategy gains on the conjunctive half only: +12% there (proceed), +4% over all items (inconclusive)."""
    tagged = _fake_report(tmp_path / "tagged", 0.8, tagged=True, conjunctive_only=True)
    untagged = _fake_report(tmp_path / "untagged", 0.8, tagged=False, conjunctive_only=True)
    decision = tagged.split("## Decision")[1].split("\n## ")[0]
    conjunctive, everything = decision.split("**all items (")
    assert "**conjunctive items (200 cloze items in 50 chapters, 200 next-token slots)**: the decision" in conjunctive
    assert "all items (" not in conjunctive and "400 cloze items in 50 chapters" in everything
    assert "shown, not the decision" in everything
    assert _row(conjunctive, "weighted").endswith("| **proceed** |")
    assert _row(everything, "weighted").endswith("| **inconclusive** |")
    assert "| met (proceed) |" in tagged and "the decision reads the conjunctive set" in tagged
    for section in ("## Metrics per strategy", "## Next-token at connectives", "## Baselines"):
        assert "conjunctive" in tagged.split(section)[1].split("\n## ")[0], section
    # untagged: one line says so, every table is on all items, and the decision reads them
    assert "- items: not tagged by connective sense (the eval.json files carry no `conjunctive` field)" in untagged
    assert "conjunctive items (" not in untagged and "conjunctive %" not in untagged
    assert _row(untagged.split("## Decision")[1], "weighted").endswith("| **inconclusive** |")
    assert "| not met (inconclusive) |" in untagged



def test_tagged_items_with_no_conjunctive_cloze_item_decide_on_all_items(tmp_path):
    args = compare.parse_args(["--strategies", "none", "--seeds", "1", "--out", str(tmp_path), "--bootstrap", "200"])
    runs = compare.plan_runs(args)
    credits = (np.arange(40) % 3 == 0).astype(float)
    evaluated = {runs[0].name: _fake_eval(credits, credits, conjunctive=np.zeros(40, dtype=bool))}
    data = compare.ReportData(runs, {runs[0].name: {"summary": {"steps": 5}}}, evaluated)
    assert data.tagged and data.sets == ("conjunctive", "all") and data.decision_set == "all"
    report = compare.build_report(data, args, "python -m genesis.compare", 1.0)
    assert "the decision reads the all set (no cloze item is conjunctive)" in report
    assert "**conjunctive items (0 cloze items in 0 chapters, 0 next-token slots)**: shown, not the decision\n\n" \
           "No cloze item in this set." in report


def _row(text: str, strategy: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {strategy} |"))


def test_the_report_states_its_statistics_and_tests_next_token_log_p(tmp_path):
    report = _fake_report(tmp_path, 0.8, strategies="none,weighted,structural,uniform")
    assert ("- statistics: resampling unit = held-out chapters (50 for the cloze items of the decision's set, all); "
            "correction = Holm over the m = 3 strategies compared") in report
    decision = report.split("## Decision")[1].split("\n## ")[0]
    # Holm rejects the two smallest p-values (at 0.05/3 and 0.05/2) and reaches the third: each interval is at the
    # level of its rank by p, 1 - 0.05/3, 1 - 0.05/2, 1 - 0.05
    cells = [re.search(r"\| (\d+(?:\.\d+)?)% \| ([\d.e-]+) / ([\d.e-]+) \|", _row(decision, s))
             for s in ("weighted", "structural", "uniform")]
    by_p = sorted(cells, key=lambda m: float(m[2]))
    assert [m[1] for m in by_p] == ["98.33", "97.5", "95"], [m[0] for m in cells]
    assert [float(m[3]) <= 0.05 for m in by_p] == [True, True, False], [m[0] for m in cells]
    assert re.search(r"\| \+\d+\.\d \[[-+]\d+\.\d, [-+]\d+\.\d\], 3/3 > 0 \|", _row(decision, "weighted"))
    nt = report.split("## Next-token at connectives: paired tests against `none`")[1].split("\n## ")[0]
    assert "| strategy | Δ log p [CI] | CI level | p / Holm p | seed-paired Δ log p |" in nt
    assert re.match(r"\| weighted \| \+0\.\d{3} \[[-+]0\.\d{3}, [-+]0\.\d{3}\] \| [\d.]+% \|", _row(nt, "weighted"))


def test_the_masked_context_gap_is_paired_against_none_and_the_random_control(tmp_path, monkeypatch):
    monkeypatch.setitem(compare.STRATEGIES, "random", ("masking.enabled=true", "masking.strategy=uniform"))

    def masked_context(strategy, seed):  # gaps: none 0.7 + seed/100, random 0.2, weighted 0.1 (+ seed/1000)
        gap = {"none": 0.7 + seed / 100, "random": 0.2, "weighted": 0.1 + seed / 1000}[strategy]
        return {"k": 8, "n": 10, "visible_loss": 4.0, "masked_loss": 4.0 + gap, "gap": gap,
                "deleted_loss": 4.3, "deletion_gap": 0.3}

    report = _fake_report(tmp_path, 0.8, strategies="none,random,weighted", masked_context=masked_context)
    masked = report.split("## Loss after connectives")[1].split("\n## ")[0]
    assert "No `random` runs" not in masked and "No deletion variant" not in masked
    assert ("| strategy | visible | masked | gap | gap - none's | gap - random's | deleted | deletion gap "
            "| deletion gap - none's | deletion gap - random's |") in masked
    cells = [c.strip() for c in _row(masked, "weighted").split("|")[1:-1]]
    # weighted - none per seed: -0.6 - 0.009 s (s = 1, 2, 3): mean -0.618, t half-width 4.303 x 0.009 / sqrt(3)
    assert cells[4] == "-0.618 [-0.640, -0.596], 0/3 > 0"
    assert cells[5].startswith("-0.098 [") and cells[5].endswith(", 0/3 > 0")
    assert cells[6:] == ["4.300", "0.300", "0.000, 0/3 > 0", "0.000, 0/3 > 0"]
    assert _row(masked, "random").split("|")[6].strip() == ""  # no gap against itself


def test_realised_rates_come_from_metrics_jsonl(tmp_path):
    def write(run_dir, records):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    counted = tmp_path / "counted"
    write(counted, [{"kind": "train", "step": 5, "masked_fraction": 0.01, "masked_connectives": 6,
                     "connective_words": 20},
                    {"kind": "adapt", "step": 5, "observed": 30, "weights": {"for": 0.6, "but": 0.45}},
                    {"kind": "eval", "step": 5, "heldout_loss": 4.0},
                    {"kind": "train", "step": 10, "masked_fraction": 0.03, "masked_connectives": 4,
                     "connective_words": 30},
                    {"kind": "adapt", "step": 10, "observed": 30, "weights": {"for": 0.72}}])
    rates = compare.run_rates(counted)
    assert rates["connective_share"] == pytest.approx(10 / 50) and rates["per_1000"] == pytest.approx(20.0)
    assert rates["masked_per_step"] == 5 and rates["adapted"] == {"for": 0.72, "but": 0.45}
    older = tmp_path / "older"  # records from before connective_words was counted: no share, the rate still
    write(older, [{"kind": "train", "step": 5, "masked_fraction": 0.01, "masked_connectives": 6}])
    assert math.isnan(compare.run_rates(older)["connective_share"]) and compare.run_rates(older)["per_1000"] == 10
    write(tmp_path / "unmasked", [{"kind": "train", "step": 5, "loss": 4.0}])
    assert compare.run_rates(tmp_path / "unmasked") is None and compare.run_rates(tmp_path / "absent") is None


def test_the_report_lists_realised_rates_and_final_adaptive_weights(tmp_path):
    args = compare.parse_args(["--strategies", "none,adaptive", "--seeds", "1,2", "--out", str(tmp_path)])
    for spec in compare.plan_runs(args):
        spec.run_dir.mkdir(parents=True)
        if spec.strategy == "adaptive":
            records = [{"kind": "train", "step": 5, "masked_fraction": 0.01 * spec.seed, "masked_connectives": 5,
                        "connective_words": 10 * spec.seed},
                       {"kind": "adapt", "step": 5, "observed": 9, "weights": {"for": 0.5 + spec.seed / 2}}]
            (spec.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = compare.ReportData(compare.plan_runs(args), {}, {r.name: {} for r in compare.plan_runs(args)})
    section = "\n".join(rates_section(data, args))
    assert "| none | no masking | | |" in section
    # connective share per seed 50% and 25%: mean 37.5 +- 12.706 x 17.68 / sqrt(2), clipped to [0, 100]; per 1,000:
    # 10 and 20
    assert "| adaptive | 37.5 [0.0, 100.0] | 15.0 [0.0, 78.5] | 5.0 |" in section
    # "for" ends at 1.0 and 1.5 (mean 1.25) from its default weight; the other words never moved
    assert re.search(r"\*\*adaptive\*\*: final adaptive weights, mean over 2 seed\(s\) \(initial in parentheses\): "
                     r"\*for\* 1\.25 \(\d\.\d\d\); \d+ other words at their initial weights\.", section)


def test_the_scale_check_is_a_paired_interval_of_baseline_minus_trigram():
    trigram = np.tile((np.arange(300) < 180).astype(float), (2, 1))
    units = [f"Book {i % 30 + 1}" for i in range(300)]  # 30 chapters, each with items from all along
    assert compare.informative_scale(trigram.copy(), trigram, units, 500).diff_ci == (0.0, 0.0)  # equal: not above 0
    assert not compare.informative_scale(trigram.copy(), trigram, units, 500).informative
    better = trigram.copy()
    better[:, 180:240] = 1.0  # right wherever the trigram is, and on 20% more items
    check = compare.informative_scale(better, trigram, units, 500)
    assert check.informative and check.diff_ci[0] > 0.1 and check.baseline - check.trigram == pytest.approx(0.2)
    assert check.units == 30 and "paired bootstrap over 30 held-out chapters, 95%" in "\n".join(check.lines())


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

    monkeypatch.setattr(jobs, "start_training", fake_start)
    monkeypatch.setattr(jobs, "finish_training", lambda job: {"train_s": 0.0})
    monkeypatch.setattr(jobs, "evaluate_run", fake_evaluate)
    trained, evaluated, failed = compare.run_all(runs, args, time.time())
    assert started == ["none-seed1", "none-seed2"] and not failed
    assert evaluated == {"none-seed1": {"run": "none-seed1"}, "none-seed2": {"run": "none-seed2"}}
