"""genesis.plot: learning curves of several real runs in one PNG; bad or missing runs are one line."""

import json

import pytest

from genesis import plot


def test_two_runs_make_one_png_with_a_panel_per_metric_they_have(tiny_runs, tmp_path, capsys):
    out = tmp_path / "figs" / "curves.png"
    assert plot.main([str(tiny_runs["tied"]), str(tiny_runs["untied-head"] / "metrics.jsonl"), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out} (2 runs)\n"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    tied, head = plot.read_curves(str(tiny_runs["tied"])), plot.read_curves(str(tiny_runs["untied-head"]))
    assert (tied.label, head.label) == ("tied", "untied-head")
    assert tied.series["loss"][0] == [1, 2, 3, 4] and tied.series["heldout_loss"][0] == [0, 2, 4]
    assert "heldout_class_accuracy" in head.series and "heldout_class_accuracy" not in tied.series


def test_runs_with_the_same_name_are_labelled_by_their_paths(tiny_runs, tmp_path):
    copies = []
    for parent in ("a", "b"):
        (tmp_path / parent / "run").mkdir(parents=True)
        (tmp_path / parent / "run" / "metrics.jsonl").write_text((tiny_runs["tied"] / "metrics.jsonl").read_text())
        copies.append(plot.read_curves(str(tmp_path / parent / "run")))
    plot.distinct_labels(copies)
    assert [c.label for c in copies] == [str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")]


@pytest.mark.parametrize("case, message", [
    ("missing", "missing: not found (give a run directory or its metrics.jsonl)"),
    ("empty_dir", "empty_dir: no metrics.jsonl in it"),
    ("damaged", "metrics.jsonl:2: not a JSON record (a damaged metrics.jsonl?)"),
    ("foreign", "metrics.jsonl:1: not a Genesis metrics record (no integer step)"),
    ("no_records", "metrics.jsonl: no training or evaluation records yet"),
])
def test_a_bad_run_is_one_line(tiny_runs, tmp_path, monkeypatch, capsys, case, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty_dir").mkdir()
    lines = {"damaged": json.dumps({"kind": "train", "step": 1, "loss": 3.0}) + "\n{not json",
             "foreign": json.dumps({"epoch": 1}), "no_records": ""}
    if case in lines:
        (tmp_path / case).mkdir()
        (tmp_path / case / "metrics.jsonl").write_text(lines[case])
    assert plot.main([str(tiny_runs["tied"]), case, "--out", "x.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_out_must_be_a_png(tiny_runs, capsys):
    assert plot.main([str(tiny_runs["tied"]), "--out", "curves.pdf"]) == 2
    assert capsys.readouterr().err == "error: --out curves.pdf: name a .png file\n"


def _end_only_run(path, train_steps: tuple[int, ...], loss: float) -> str:
    """A run that logs the training loss at `train_steps` and evaluates once, at step 10."""
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s, "loss": 9.0 - s / 10})
                                                + "\n" for s in train_steps)
                                        + json.dumps({"kind": "eval", "step": 10, "heldout_loss": loss,
                                                      "heldout_connective_accuracy": 0.125}) + "\n")
    return str(path)


def test_metrics_with_one_point_per_run_are_a_table_not_a_panel(tmp_path, capsys):
    runs = [_end_only_run(tmp_path / "a", (5, 10), 7.5), _end_only_run(tmp_path / "b", (5, 10), 7.25)]
    curves = [plot.read_curves(r) for r in runs]
    drawn, single = plot.curve_panels(curves)
    assert [p[1] for p in drawn] == ["loss"]
    assert [p[1] for p in single] == ["heldout_loss", "heldout_connective_accuracy"]
    out = tmp_path / "curves.png"
    assert plot.main([*runs, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out == (
        f"wrote {out} (2 runs)\none point per run, not plotted:\nheld-out loss:\n  a  step      10  7.5\n"
        "  b  step      10  7.25\nheld-out connectives: next-token accuracy (%):\n  a  step      10  12.5\n"
        "  b  step      10  12.5\n")


def test_runs_with_one_point_per_metric_write_no_png(tmp_path, capsys):
    runs = [_end_only_run(tmp_path / "a", (10,), 7.5), _end_only_run(tmp_path / "b", (10,), 7.25)]
    out = tmp_path / "curves.png"
    assert plot.main([*runs, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("no curve to draw: every metric has one point per run (2 runs); no PNG written\n"
                              "one point per run, not plotted:\ntraining loss:\n  a  step      10  8\n")
    assert not out.exists()
