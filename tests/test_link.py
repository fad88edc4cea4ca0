"""The link readout's features (the state at the stop, or the mean over the consequent span), the link head in the
model and the step, and its config keys."""

import contextlib

import pytest
import torch

from genesis.config import ConfigError, ModelConfig, load_config
from genesis.link import LINK_READOUTS, link_features
from genesis.model import ClassLoss, Llama, ModelArgs, class_loss, param_count
from genesis.step import accumulate_gradients


def test_stop_reads_the_state_itself():
    h = torch.randn(2, 7, 4)
    assert torch.equal(link_features(h, torch.full((2, 7), -1), "stop"), h)


def test_span_is_the_mean_from_the_start_to_the_readout_position_inclusive():
    torch.manual_seed(0)
    h = torch.randn(3, 9, 5)
    start = torch.full((3, 9), -1)
    start[0, 4], start[1, 8], start[2, 0], start[2, 6] = 2, 1, 0, 6  # a span, one to the row's end, one of length 1
    got = link_features(h, start, "span")
    for b, t in zip(*torch.nonzero(start >= 0, as_tuple=True)):
        s = int(start[b, t])
        torch.testing.assert_close(got[b, t], h[b, s:int(t) + 1].mean(0), rtol=1e-5, atol=1e-6)
    keep = (start < 0).unsqueeze(-1).expand_as(h)
    assert torch.equal(got[keep], h[keep])  # positions without a readout keep their own state


def test_unknown_readout_is_refused_in_one_line():
    with pytest.raises(ValueError, match="link readout must be one of stop, span"):
        link_features(torch.zeros(1, 2, 3), torch.full((1, 2), -1), "mean")


# ----------------------------------------------------------------------------------------------------------------
# The config keys


@pytest.mark.parametrize("overrides, reason", [
    (["model.link_head=true"], "model.link_head: is trained on the masker's readout targets: it needs "
                               "masking.enabled = true"),
    (["model.link_head=true", "masking.enabled=true"], "model.link_head: is trained on the masker's readout targets: "
                                                       "it needs masking.readout = true"),
    (["model.link_readout=mean"], "model.link_readout: must be one of stop, span (got 'mean')"),
    (["training.link_loss_weight=0"], "training.link_loss_weight: must be > 0 (got 0.0)"),
])
def test_link_settings_that_cannot_run_are_one_config_error_line(overrides, reason):
    with pytest.raises(ConfigError) as e:
        load_config("cpu.toml", overrides=overrides)
    message = str(e.value)
    assert "\n" not in message and message.startswith("--set ") and message.endswith(reason), message


def test_the_link_head_runs_with_masking_and_readout():
    cfg = load_config("cpu.toml", overrides=["model.link_head=true", "masking.enabled=true", "masking.readout=true",
                                             "model.link_readout=span"])
    assert cfg.model.link_head and cfg.model.link_readout == "span" and cfg.training.link_loss_weight == 0.3


# ----------------------------------------------------------------------------------------------------------------
# The head in the model

WORDS = 6  # lexicon entries of the small models below


def tiny(link_head: bool = False, readout: str = "stop", class_head: bool = False) -> Llama:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, dim=32, n_heads=2, seq_len=16, link_head=link_head, link_readout=readout,
                      class_head=class_head)
    return Llama(ModelArgs.from_config(cfg, vocab_size=50, link_words=WORDS))


def readout_batch():
    """(x, y, readout, readout_start) of two rows of 12 with three readout positions, one a span of length 1."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 50, (2, 12), generator=g), torch.randint(0, 50, (2, 12), generator=g)
    readout, start = torch.full((2, 12), -100), torch.full((2, 12), -1)
    for b, t, word, s in ((0, 5, 2, 2), (0, 11, 4, 7), (1, 3, 0, 3)):
        readout[b, t], start[b, t] = word, s
    return x, y, readout, start


def test_the_head_names_the_lexicon_and_leaves_the_trunk_and_the_random_stream_alone():
    """The head has one output per lexicon entry; the same seed gives the same trunk with and without it (and with
    the class head too), and the same draws after the model is built: a run with the head is paired with one
    without."""
    with_head = tiny(link_head=True)
    draw_after = torch.rand(3)
    without = tiny()
    assert torch.equal(draw_after, torch.rand(3))
    assert without.link_head is None and without.args.link_words == 0
    assert with_head.link_head.weight.shape == (WORDS, 32) and torch.equal(with_head.link_head.bias, torch.zeros(WORDS))
    assert {k for k in with_head.state_dict() if k.startswith("link_head.")} == {"link_head.weight", "link_head.bias"}
    both = tiny(link_head=True, class_head=True)
    for model in (with_head, both):
        trunk = model.state_dict()
        for name, weight in without.state_dict().items():
            assert torch.equal(trunk[name], weight), name
    assert torch.equal(both.class_head.weight, tiny(class_head=True).class_head.weight)  # the class head as before
    assert param_count(with_head.args) == with_head.num_params()
    assert param_count(both.args) == both.num_params()


@pytest.mark.parametrize("readout", LINK_READOUTS)
def test_link_loss_is_the_cross_entropy_at_the_readout_positions_only(readout):
    """Against a hand computation: the head's logits of each readout position's features (the state there, or the
    mean of the states over its span), their cross-entropy, mean over the three positions; the LM loss as without
    readout; no labels: loss 0 and a zero gradient (the head is in the graph, as DDP needs)."""
    m = tiny(link_head=True, readout=readout)
    with torch.no_grad():
        m.link_head.weight.normal_(0, 1.0)  # a head with opinions, so that argmax and loss are not degenerate
    x, y, target, start = readout_batch()
    logits, loss, class_part, link = m(x, y, None, target, start)
    assert class_part is None and isinstance(link, ClassLoss)
    assert torch.equal(loss, m(x, y)[1]) and torch.equal(logits, m(x, y)[0])
    with torch.no_grad():
        h = m.hidden(x)
    picked, truth = [], []
    for b, t, word, s in ((0, 5, 2, 2), (0, 11, 4, 7), (1, 3, 0, 3)):
        feature = h[b, t] if readout == "stop" else h[b, s : t + 1].mean(0)
        picked.append(feature @ m.link_head.weight.T + m.link_head.bias)
        truth.append(word)
    picked, truth = torch.stack(picked), torch.tensor(truth)
    manual = -torch.log_softmax(picked, -1)[torch.arange(3), truth].mean()
    torch.testing.assert_close(link.loss, manual, rtol=1e-5, atol=1e-6)
    assert link.count.item() == 3 and link.correct.item() == (picked.argmax(-1) == truth).sum().item()
    # nothing to read: loss 0, not nan, and a zero gradient
    _, _, _, none = m(x, y, None, torch.full_like(target, -100), torch.full_like(start, -1))
    assert none.loss.item() == 0 and none.count.item() == 0
    none.loss.backward()
    assert m.link_head.weight.grad is not None and m.link_head.weight.grad.abs().max() == 0
    with pytest.raises(ValueError, match="no link head"):
        tiny()(x, y, None, target, start)


def test_stop_and_span_reach_the_head_as_the_features_say():
    """The same weights read at "stop" and at "span" give the head's logits of link_features(h, start, readout):
    the interface the evaluation reads (model.link_head(link_features(model.hidden(x), start,
    model.args.link_readout))), and the two readouts differ where a span is longer than one position."""
    stop, span = tiny(link_head=True, readout="stop"), tiny(link_head=True, readout="span")
    span.load_state_dict(stop.state_dict())
    x, y, target, start = readout_batch()
    losses = {}
    for model in (stop, span):
        with torch.no_grad():
            expected = class_loss(model.link_head(link_features(model.hidden(x), start, model.args.link_readout)),
                                  target)
            losses[model.args.link_readout] = model(x, y, None, target, start)[3]
        assert torch.equal(losses[model.args.link_readout].loss, expected.loss)
    assert not torch.equal(losses["stop"].loss, losses["span"].loss)


def test_accumulate_gradients_adds_the_weighted_link_loss():
    """(x, y, classes or None, readout, readout_start) micro-batches: the objective adds link_weight x the link
    loss (the head's gradient is that multiple of the link loss's alone), the returned loss is the LM loss, and the
    link statistics are (cross-entropy sum, correct, labelled) over the micro-batches, beside the class head's."""
    x, y, target, start = readout_batch()
    fp32 = contextlib.nullcontext()
    m, ref = tiny(link_head=True, class_head=True), tiny(link_head=True, class_head=True)
    classes = torch.full_like(target, -100)
    classes[0, 4], classes[1, 1] = 1, 3
    batches = [(x[i:i + 1], y[i:i + 1], classes[i:i + 1], target[i:i + 1], start[i:i + 1]) for i in (0, 1)]
    loss, class_stats, link_stats = accumulate_gradients(m, batches, fp32, 0.5, link_weight=0.25)
    parts = [ref(*batch) for batch in batches]
    (sum(link.loss for *_, link in parts) / 2).backward()
    torch.testing.assert_close(m.link_head.weight.grad, 0.25 * ref.link_head.weight.grad)
    torch.testing.assert_close(loss, sum(part[1] for part in parts).detach() / 2)
    expected = torch.stack([sum(link.loss * link.count for *_, link in parts),
                            sum(link.correct for *_, link in parts).float(), torch.tensor(3.0)]).detach()
    torch.testing.assert_close(link_stats, expected)
    assert class_stats[2].item() == 2  # the class head's two labels, counted apart
    # a link head alone: the class slot of the micro-batch is None
    m = tiny(link_head=True)
    _, class_stats, link_stats = accumulate_gradients(m, [(x, y, None, target, start)], fp32, 0.5, link_weight=0.25)
    assert torch.equal(class_stats, torch.zeros(3)) and link_stats[2].item() == 3


def test_a_checkpoint_without_the_head_loads_and_gives_the_same_logits():
    """model_args saved before the link head lacked its fields: such a checkpoint builds the same model (no head),
    loads its weights and gives the same logits; a model with the head gives the same LM logits from the same
    trunk, and forward without readout returns (logits, loss) as before."""
    old = tiny()
    saved = {k: v for k, v in vars(old.args).items() if k not in ("link_words", "link_readout")}
    again = Llama(ModelArgs(**saved))
    again.load_state_dict(old.state_dict())
    x, y, *_ = readout_batch()
    assert again.link_head is None
    out_old, out_again, out_head = old(x, y), again(x, y), tiny(link_head=True)(x, y)
    assert len(out_old) == len(out_again) == len(out_head) == 2
    for a, b in ((out_old, out_again), (out_old, out_head)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
