"""genesis.curriculum and the masker's side of it: connective loss weights, adaptive weights, the plateau schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

from genesis.config import ConfigError, load_config
from genesis.curriculum import Curriculum, count_first_pieces
from genesis.data import get_batch
from genesis.masking import ConnectiveMasker, MaskingError
from genesis.step import accumulate_gradients, weighted_lm_loss
from genesis.train import CHECKPOINT, train

from .test_train import records, signal_handlers, small_config  # noqa: F401 (a fixture)


class FixedLogits(torch.nn.Module):
    """A "model" whose logits are a parameter: model(x, y) -> (logits, mean CE) as Llama's forward."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, x, y=None):
        loss = None if y is None else F.cross_entropy(self.logits.view(-1, self.logits.size(-1)), y.reshape(-1))
        return self.logits, loss


def test_connective_loss_weight_scales_only_the_connective_targets():
    """Three targets with known cross-entropies, the middle one a connective piece, weight 3: the loss is
    (c0 + 3 c1 + c2) / 5, its gradient at the other targets' logits is 1/5 of theirs (1/3 in the plain mean) and
    at the connective's 3/5; weights of 1 give the plain mean."""
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 5)
    y = torch.tensor([[1, 4, 2]])
    terms = F.cross_entropy(logits.view(-1, 5), y.view(-1), reduction="none")
    w = torch.tensor([[1.0, 3.0, 1.0]])
    model = FixedLogits(logits)
    loss, _, _ = accumulate_gradients(model, [(y, y)], torch.autocast("cpu", enabled=False), loss_weights=[w])
    assert loss.item() == pytest.approx(((terms[0] + 3 * terms[1] + terms[2]) / 5).item(), rel=1e-6)
    weighted_grad = model.logits.grad.clone()
    model.logits.grad = None
    plain, _, _ = accumulate_gradients(model, [(y, y)], torch.autocast("cpu", enabled=False))
    assert plain.item() == pytest.approx(terms.mean().item(), rel=1e-6)
    ratio = weighted_grad[0].norm(dim=-1) / model.logits.grad[0].norm(dim=-1)
    torch.testing.assert_close(ratio, torch.tensor([3 / 5, 9 / 5, 3 / 5]))
    assert weighted_lm_loss(logits, y, torch.ones(1, 3)).item() == pytest.approx(terms.mean().item(), rel=1e-6)


@pytest.fixture(scope="module")
def masker(kjv_tokenizer):
    cfg = load_config("cpu.toml", overrides=["masking.enabled=true", "masking.adaptive=true",
                                             "masking.adapt_min_count=4"]).masking
    return ConnectiveMasker.from_tokenizer(kjv_tokenizer, cfg, mask_token="[MASK]", log=None)


def test_target_matches_are_the_matches_over_the_whole_window(masker, kjv_corpus):
    """Every target column, the last included: a piece of a match of the (B, T + 1) window, as a masker that masks
    every match (uniform, p = 1) marks it; first pieces carry the entry that masker writes there."""
    every = ConnectiveMasker.from_tokenizer(kjv_corpus.tokenizer, strategy="uniform", mask_prob=1.0,
                                            mask_token="[MASK]", log=None)
    batch = get_batch(kjv_corpus.splits["train"], 32, 64, 1, 3)
    window = torch.cat([batch.x[:, :1], batch.y], 1)
    piece, first = masker.target_matches(window)
    full = every(window, step=0)
    assert torch.equal(piece, full.matched[:, 1:]) and piece.sum() > 50
    starts = first >= 0
    assert torch.equal(first[starts], full.connectives[:, 1:][starts])
    continues = full.matched[:, 1:] & ~starts  # later pieces of a word: the previous column is the same word's
    assert torch.equal(full.connectives[:, 1:][continues], full.connectives[:, :-1][continues])
    assert piece[:, -1].any()  # the last column, which the masker's pass over x never sees, has matches
    cfg = small_config("masking.enabled=true", "training.connective_loss_weight=2.5")
    weights, first_none = Curriculum(cfg, masker, torch.device("cpu")).micro_batch(batch.x, batch.y)
    assert first_none is None and torch.equal(weights, torch.where(piece, 2.5, 1.0))
    assert Curriculum(small_config("masking.enabled=true"), masker, torch.device("cpu")).micro_batch(
        batch.x, batch.y) == (None, None)  # weight 1: the model's own loss, as without the feature


def test_count_first_pieces_counts_argmax_hits_per_entry():
    logits = torch.zeros(1, 4, 6)
    logits[0, 0, 2] = logits[0, 1, 5] = logits[0, 2, 3] = logits[0, 3, 1] = 1.0  # argmax 2, 5, 3, 1
    y = torch.tensor([[2, 4, 3, 1]])
    first = torch.tensor([[0, 0, 2, -1]])
    assert count_first_pieces(logits, y, first, 3).tolist() == [[1, 0, 1], [2, 0, 1]]


def test_adapt_moves_weights_in_the_stated_direction_and_stays_in_bounds(masker):
    base = masker.weights()
    E = base.numel()
    count = torch.full((E,), 10)
    count[3] = 3  # below adapt_min_count: unchanged
    correct = torch.full((E,), 7)  # 0.7: between the thresholds, unchanged
    correct[0], correct[1], correct[2] = 2, 10, 5  # 0.2 -> up, 1.0 -> down, 0.5 is not below adapt_low
    correct[3] = 0
    changed = masker.adapt(correct, count)
    now = masker.weights()
    assert set(changed) == {0, 1}
    assert now[0] == pytest.approx(min(2.0, base[0] * 1.2)) and now[1] == pytest.approx(max(0.1, base[1] * 0.9))
    assert torch.equal(now[2:], base[2:])
    assert torch.equal(masker.tables("cpu").entry_weight, now)  # the table the draws read
    for _ in range(40):  # a stream of hard words for entry 0, easy ones for entry 1
        masker.adapt(correct, count)
    now = masker.weights()
    assert now[0] == pytest.approx(2.0) and now[1] == pytest.approx(0.1)
    assert bool(((now >= 0.1) | (now == base)).all()) and bool((now <= 2.0).all())
    masker.set_weights(base)
    with pytest.raises(MaskingError, match="shape"):
        masker.adapt(correct[:2], count[:2])


@pytest.mark.parametrize("sets, message", [
    (["masking.adaptive=true", "masking.strategy=uniform"], "masking.adaptive: adapts the connectives' weights"),
    (["masking.adaptive=true", "masking.strategy=structural"], "structural_weights = true"),
    (["training.connective_loss_weight=2"], "training.connective_loss_weight: finds the connectives with the masker"),
    (["masking.adaptive=true"], "masking.adaptive: adapts the masking weights: it needs masking.enabled = true"),
])
def test_curriculum_settings_that_cannot_work_are_one_line(sets, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config("cpu.toml", overrides=sets)
    assert "\n" not in str(e.value)


CURRICULUM = ("masking.enabled=true", "masking.adaptive=true", "masking.adapt_every=4", "masking.adapt_min_count=1",
              "masking.schedule=plateau", "masking.schedule_steps=4", "masking.plateau_window=2",
              "masking.plateau_delta=100", "training.connective_loss_weight=2", "training.log_every=2",
              "training.eval_every=0", "training.warmup_steps=0", "training.lr=0.002", "training.min_lr=0.002")


@pytest.mark.usefixtures("signal_handlers")
def test_interrupted_and_resumed_equals_uninterrupted_with_adaptive_and_plateau(tmp_path):
    """6 + 6 resumed steps equal 12: the same losses, masks, weight updates, plateau step and model weights (the
    checkpoint at step 6 holds the counters of steps 5 and 6, read at the update of step 8)."""
    train(small_config(*CURRICULUM, "training.steps=12"), tmp_path / "a")
    train(small_config(*CURRICULUM, "training.steps=6"), tmp_path / "b")
    train(small_config(*CURRICULUM, "training.steps=12"), tmp_path / "b", resume=True)
    ra, rb = records(tmp_path / "a"), records(tmp_path / "b")
    keep = ("kind", "step", "loss", "masked_connectives", "weights", "plateau_step", "observed")
    ra, rb = ([{k: r.get(k) for k in keep} for r in run if r["kind"] != "eval"] for run in (ra, rb))
    assert ra == rb
    assert [r["step"] for r in ra if r["plateau_step"] is not None] == [4]  # masking starts at step 4
    assert [r["masked_connectives"] for r in ra if r["kind"] == "train"][:2] == [0, 0]
    assert any(r["masked_connectives"] > 0 for r in ra if r["kind"] == "train")
    adapts = [r for r in ra if r["kind"] == "adapt"]
    assert len(adapts) == 3 and all(r["observed"] > 0 for r in adapts) and any(r["weights"] for r in adapts)
    ca, cb = (torch.load(d / CHECKPOINT, weights_only=True) for d in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert torch.equal(ca["curriculum"]["weights"], cb["curriculum"]["weights"])
    assert ca["curriculum"]["plateau_step"] == 4 and not math.isnan(ca["curriculum"]["ema"])


def test_masked_chain_counts_equal_the_chains_of_each_row_when_everything_is_masked(kjv_corpus):
    """stats' masked_chains / masked_chain_words (logged per step with chain = true): with p = 1 every chain is
    masked, so they equal the chains and members `chain_statistics` finds in each row; at p = 0 there are none."""
    masker = ConnectiveMasker.from_tokenizer(kjv_corpus.tokenizer, strategy="uniform", mask_prob=1.0, chain=True,
                                             mask_token="[MASK]", log=None)
    batch = get_batch(kjv_corpus.splits["train"], 16, 128, 1, 5)
    stats = masker.stats(masker(batch.x, step=0), batch.x)
    rows = [masker.chain_statistics(row) for row in batch.x]
    assert int(stats["masked_chains"]) == sum(r["chains"] for r in rows) > 3
    assert int(stats["masked_chain_words"]) == sum(r["members"] for r in rows)
    masker.tables("cpu").prob_table.zero_()
    assert int(masker.stats(masker(batch.x, step=0), batch.x)["masked_chains"]) == 0
