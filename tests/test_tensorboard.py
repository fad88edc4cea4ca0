"""training.tensorboard: the event files hold the scalars of metrics.jsonl at their steps, also after a resume."""

import sys

import pytest

import genesis.train as trainer
from genesis.train import train

from .test_train import SMALL, optimizer_step_failing, records, small_config

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard reads the run's event files (events past a resume point purged)."""
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_event_files_hold_the_logged_scalars_and_a_resume_does_not_repeat_steps(tmp_path, monkeypatch):
    """A run with the class head: every number of every record is a scalar at its step. A run killed at step 4
    (checkpoint at 2, step 3 logged past it) and resumed reads back as the uninterrupted run."""
    cfg = small_config("training.steps=5", "training.eval_every=2", "training.log_every=1",
                       "training.checkpoint_every=2", "training.tensorboard=true", "masking.enabled=true",
                       "model.class_head=true")
    straight = tmp_path / "straight"
    train(cfg, straight)
    tb = scalars(straight)
    train_recs, eval_recs = records(straight, "train"), records(straight, "eval")
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                     ("train/tokens_per_s", "tokens_per_s"), ("train/masked_fraction", "masked_fraction"),
                     ("train/class_accuracy", "class_accuracy")):
        # class_accuracy is None (null) at a step that masked nothing: no scalar there
        assert tb[tag] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in train_recs if r[key] is not None], tag
    for tag, key in (("heldout/loss", "heldout_loss"), ("heldout/connective_accuracy", "heldout_connective_accuracy"),
                     ("heldout/class_loss", "heldout_class_loss")):
        assert tb[tag] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in eval_recs], tag
    word, stats = sorted(eval_recs[-1]["heldout_by_connective"].items())[0]
    assert tb[f"heldout_connective_accuracy/{word}"][-1] == (5, pytest.approx(stats["accuracy"], rel=1e-6))

    optimizer_step_failing(monkeypatch, 4, RuntimeError("killed inside the optimizer step"))  # no save there
    with pytest.raises(RuntimeError, match="killed inside"):
        train(cfg, tmp_path / "killed")
    monkeypatch.undo()
    assert [step for step, _ in scalars(tmp_path / "killed")["train/loss"]] == [1, 2, 3]  # 3: past the checkpoint
    train(cfg, tmp_path / "killed", resume=True)
    resumed = scalars(tmp_path / "killed")
    assert resumed.keys() == tb.keys()
    for tag in ("train/loss", "train/masked_fraction", "heldout/loss", "heldout/class_accuracy"):
        assert resumed[tag] == tb[tag], tag  # each step once, with the uninterrupted run's value


def test_without_the_package_it_is_one_line_before_the_run_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it raises ImportError
    out = tmp_path / "run"
    assert trainer.main(["--config", "cpu.toml", *SMALL, "--out", str(out), "--set", "training.tensorboard=true"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --set training.tensorboard=true: training.tensorboard: needs the tensorboard package "
                   "(pip install tensorboard, or pip install 'genesis-masking[tensorboard]')\n")
    assert not out.exists()


def test_adapt_records_chart_each_new_weight():
    """masking.adaptive's records: the targets observed, and each changed weight on its own line of one chart."""
    from genesis.tensorboard import scalars as record_scalars

    rec = {"kind": "adapt", "step": 40, "observed": 123, "weights": {"therefore": 1.2, "but": 0.27}}
    assert record_scalars(rec) == [("adapt/observed", 123), ("adapt_weight/but", 0.27),
                                   ("adapt_weight/therefore", 1.2)]
