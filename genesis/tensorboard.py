"""TensorBoard event files beside metrics.jsonl (training.tensorboard): every number of a metrics record as a scalar
at its step, written by rank 0 from the one place records are written (genesis.train.record)."""

from __future__ import annotations

from pathlib import Path

from genesis.config import Config, ConfigError

TENSORBOARD_DIR = "tensorboard"  # inside the run directory


def check_tensorboard(cfg: Config) -> None:
    """A one-line ConfigError when training.tensorboard is on and the tensorboard package is missing."""
    if not cfg.training.tensorboard:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError(f"{cfg.origin_of('training.tensorboard')}: training.tensorboard: needs the tensorboard "
                          f"package (pip install tensorboard, or pip install 'genesis-masking[tensorboard]')") from None


def scalars(rec: dict) -> list[tuple[str, float]]:
    """(tag, value) of every number in a metrics record: `train/loss`, `heldout/connective_accuracy`, per
    connective word `heldout_connective_accuracy/because` (one chart per statistic, a line per word), and an adapt
    record's new weights as `adapt_weight/because`."""
    kind = "heldout" if rec.get("kind") == "eval" else rec.get("kind", "train")
    out = []
    for key, value in rec.items():
        if key == "heldout_by_connective":
            out += [(f"heldout_connective_{stat}/{word}", v) for word, stats in sorted(value.items())
                    for stat, v in stats.items()]
        elif key == "weights" and kind == "adapt":
            out += [(f"adapt_weight/{word}", w) for word, w in sorted(value.items())]
        elif key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((f"{kind}/{key.removeprefix('heldout_')}", value))
    return out


class TensorBoardWriter:
    """The event files of a run directory's tensorboard/ folder. A resumed run hides the events past its
    checkpoint's step, as metrics.jsonl drops those records (TensorBoard's purge_step)."""

    def __init__(self, run_dir: Path, resumed_at: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR),
                                    purge_step=None if resumed_at is None else resumed_at + 1)

    def write(self, rec: dict) -> None:
        """The record's scalars at its step, flushed: the event files hold what metrics.jsonl holds."""
        for tag, value in scalars(rec):
            self.writer.add_scalar(tag, value, rec["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
