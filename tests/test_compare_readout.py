"""Tests for genesis/compare/readout.py and the readout strategy: the link head and frozen probe beside the cloze,
the bar (each of its three conditions decides it), the probe per objective, and eval.json's format."""

import json

import numpy as np
import pytest
import torch

from genesis import compare
from genesis.compare import readout
from genesis.config import load_config
from genesis.evaluate import checkpoint_identity

from .test_compare import _fake_eval, _row


def _bar_data(tmp_path, cloze: np.ndarray, head: np.ndarray, loss_gap: float = 0.0,
              strategies: str = "none,readout", probe_gain: float = 0.0) -> compare.ReportData:
    """3 seeds of `strategies` on len(cloze) conjunctive items (8 to a chapter): every run's whole-verse cloze is
    `cloze`, the readout runs' link head is `head`, their held-out loss `loss_gap` above none's (per seed); every
    run has a frozen probe, right on the cloze's items (and, for strategies other than none, on every item whose
    index is below probe_gain x n)."""
    args = compare.parse_args(["--strategies", strategies, "--out", str(tmp_path), "--bootstrap", "1000"])
    runs = compare.plan_runs(args)
    n = len(cloze)
    trained, evaluated = {}, {}
    for r in runs:
        gain = 0.0 if r.strategy == "none" else probe_gain
        link = {"link_probe": np.maximum(cloze, np.arange(n) < gain * n)}
        if r.strategy == "readout":
            link["link_head"] = head
        evaluated[r.name] = _fake_eval(cloze, np.zeros(n), np.ones(n, dtype=bool), link=link)
        loss = 4.0 + r.seed / 1000 + (loss_gap if r.strategy == "readout" else 0.0)
        trained[r.name] = {"summary": {"steps": 5, "last_heldout_loss": loss}, "train_s": 1}
    return compare.ReportData(runs, trained, evaluated), args


def _cloze(n: int) -> np.ndarray:
    return (np.arange(n) % 5 != 0).astype(float)  # 80%, every chapter alike


def test_the_bar_is_met_when_all_three_conditions_hold(tmp_path):
    data, args = _bar_data(tmp_path, _cloze(400), np.ones(400), loss_gap=0.01)
    bar = readout.bar_verdict(data, args.bootstrap)
    assert bar["conditions"] == {"ratio": True, "interval": True, "loss": True} and bar["met"]
    assert bar["head"] == 1.0 and bar["cloze"] == pytest.approx(0.8) and bar["item_set"] == "conjunctive"
    assert bar["loss_gap"] == pytest.approx(0.01) and bar["m"] == 1
    section = "\n".join(readout.bar_section(data, args))
    assert "The bar is **met**." in section
    assert "| (1) link head >= 1.05 x none's cloze | 100.0% vs 1.05 x 80.0% = 84.0% | holds |" in section
    assert "| (3) held-out loss at most 0.02 nats above none's | 4.012 vs 4.002: +0.010 (seed-paired " in section
    assert "Δ +20.0 [+" in section and "(Holm over m = 1;" in section


def test_each_condition_of_the_bar_flips_it(tmp_path):
    cloze = _cloze(400)
    # (1) a sure gain too small: +10 items of 400 (+2.5 points, 1.03 x), spread over 10 chapters
    small = np.maximum(cloze, np.arange(400) % 40 == 0)
    # (2) a large gain from one chapter of ten: 1.14 x, but a resample without that chapter has none
    cloze80 = np.where(np.arange(80) < 8, 0.0, _cloze(80))
    one_chapter = np.where(np.arange(80) < 8, 1.0, cloze80)
    for name, (c, head, gap) in {"ratio": (cloze, small, 0.0), "interval": (cloze80, one_chapter, 0.0),
                                 "loss": (cloze, np.ones(400), 0.03)}.items():
        data, args = _bar_data(tmp_path / name, c, head, loss_gap=gap)
        bar = readout.bar_verdict(data, args.bootstrap)
        assert bar["conditions"] == {"ratio": name != "ratio", "interval": name != "interval",
                                     "loss": name != "loss"}, (name, bar)
        assert not bar["met"]
        assert f"The bar is **not met** (failed: {name})." in "\n".join(readout.bar_section(data, args))
    data, args = _bar_data(tmp_path / "lower", cloze, np.ones(400), loss_gap=-0.05)  # a lower loss passes
    assert readout.bar_verdict(data, args.bootstrap)["met"]


def test_the_bar_says_when_it_is_not_measured(tmp_path):
    data, args = _bar_data(tmp_path / "none", _cloze(80), np.ones(80), strategies="none,weighted")
    assert readout.bar_verdict(data, args.bootstrap) is None
    assert readout.bar_section(data, args)[-1] == "No `readout` runs in this comparison: the bar is not measured."
    data, args = _bar_data(tmp_path / "headless", _cloze(80), np.ones(80))
    for name in data.evaluated:
        for item in data.evaluated[name]["items"]["cloze"]:
            item["credit"].pop("link_head", None)
    data = compare.ReportData(data.runs, data.trained, data.evaluated)
    assert readout.bar_section(data, args)[-1].startswith("The `readout` runs' eval.json files carry no link-head")


def test_the_link_section_sets_the_head_and_the_probe_beside_the_cloze(tmp_path):
    data, args = _bar_data(tmp_path, _cloze(400), np.ones(400), strategies="none,weighted,readout", probe_gain=0.5)
    section = "\n".join(readout.link_section(data, args))
    assert "| strategy | cloze acc. % (verse) | probe acc. % | link head acc. % | Δ probe - cloze [CI] " in section
    none, weighted, head = (_row(section, s) for s in ("none", "weighted", "readout"))
    # none's probe is right exactly where its cloze is: Δ 0; weighted's also on the first half's cloze misses (the
    # seeds' equal values give a t-interval of float noise, shown as [80.0, 80.0])
    assert none.startswith("| none | 80.0 [80.0, 80.0] | 80.0 [80.0, 80.0] | no link head | +0.0 [+0.0, +0.0] |")
    assert none.endswith("|  |  |  |  |") and len(none.split("|")) == 14
    assert weighted.startswith("| weighted | 80.0 [80.0, 80.0] | 90.0 | no link head | +10.0 [+")
    assert head.startswith("| readout | 80.0 [80.0, 80.0] | 90.0 | 100.0 | +10.0 [+") and "| 95% |" in head
    assert "|---" * 12 + "|\n" in section
    assert head.endswith("| +20.0 [+20.0, +20.0], 3/3 > 0 |")  # right everywhere: +20 points in every seed


def test_the_probe_is_paired_against_the_baseline_probe(tmp_path):
    data, args = _bar_data(tmp_path, _cloze(400), np.ones(400), strategies="none,weighted,readout", probe_gain=0.5)
    section = "\n".join(readout.probe_section(data, args))
    assert "## What the probe says per objective: each strategy's probe against `none`'s" in section
    assert _row(section, "none") == "| none | 80.0 [80.0, 80.0] | (the baseline) | | | |"
    levels = set()
    for strategy in ("weighted", "readout"):
        row = _row(section, strategy)
        assert row.startswith(f"| {strategy} | 90.0 | +10.0 [+") and row.endswith("| +10.0 [+10.0, +10.0], 3/3 > 0 |")
        levels.add(row.split(" | ")[3])
    assert levels == {"97.5%", "95%"}  # Holm over the two strategies: one test at each rank's level


def test_sections_without_link_credits_say_so(tmp_path):
    data, args = _bar_data(tmp_path, _cloze(80), np.ones(80), strategies="none,weighted")
    for name in data.evaluated:
        for item in data.evaluated[name]["items"]["cloze"]:
            item["credit"].pop("link_probe")
    data = compare.ReportData(data.runs, data.trained, data.evaluated)
    assert readout.link_section(data, args)[-1].startswith("The eval.json files carry no frozen-probe credits")
    assert readout.probe_section(data, args) == []


def test_the_readout_strategy_is_structural_masking_with_the_readout_and_the_link_head():
    assert compare.STRATEGIES["readout"] == ("masking.enabled=true", "masking.strategy=structural",
                                             "masking.readout=true", "model.link_head=true")


def test_the_readout_strategy_loads_as_a_config(tmp_path):
    args = compare.parse_args(["--strategies", "readout", "--seeds", "1", "--out", str(tmp_path)])
    spec = next(r for r in compare.plan_runs(args) if r.strategy == "readout")
    cfg = load_config(args.config, None, spec.overrides)
    assert cfg.model.link_head and cfg.masking.readout and cfg.masking.enabled
    assert cfg.masking.strategy == "structural" and not cfg.model.class_head


def test_the_report_carries_the_link_sections_in_order(tmp_path):
    data, args = _bar_data(tmp_path, _cloze(400), np.ones(400), strategies="none,readout")
    report = compare.build_report(data, args, "python -m genesis.compare", 1.0)
    titles = ("## Next-token at connectives", "## The hidden link after the consequent", "## The bar:",
              "## What the probe says", "## Loss after connectives")
    order = [report.index(title) for title in titles]
    assert order == sorted(order) and "The bar is **met**." in report


def test_an_eval_json_of_an_older_format_is_evaluated_again(tmp_path):
    """reusable_eval trusts an eval.json of this format, of these settings, of the checkpoint now in the run
    directory, with its probe fitted on --probe-max-train occurrences; one stamped with format 2 (no link scorers)
    or 3 (the probe on 2,000 occurrences) is evaluated again."""
    assert compare.EVAL_FORMAT == 4
    args = compare.parse_args(["--strategies", "none", "--seeds", "1", "--out", str(tmp_path)])
    spec = compare.plan_runs(args)[0]
    spec.run_dir.mkdir(parents=True)
    torch.save({"model": {"w": torch.arange(4.0)}, "step": 5, "config": {}}, spec.run_dir / "checkpoint.pt")
    (spec.run_dir / "tokenizer.json").write_text("{}")
    identity = checkpoint_identity(spec.run_dir / "checkpoint.pt")
    record = {"compare_settings": compare.eval_settings(args), "checkpoint_identity": identity,
              "link": {"probe": {"max_train": args.probe_max_train}}}
    (spec.run_dir / "eval.json").write_text(json.dumps(record))
    assert compare.reusable_eval(spec, args) == record
    # a probe fitted on another number of training occurrences than --probe-max-train asks, or not recorded
    for probe in ({"max_train": args.probe_max_train // 2}, {}):
        (spec.run_dir / "eval.json").write_text(json.dumps(record | {"link": {"probe": probe}}))
        assert compare.reusable_eval(spec, args) is None
    for older in (2, 3):
        record["compare_settings"]["eval_format"] = older
        (spec.run_dir / "eval.json").write_text(json.dumps(record))
        assert compare.reusable_eval(spec, args) is None
