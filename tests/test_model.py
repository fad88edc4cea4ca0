"""The Llama model: shapes, causality, tied weights, gradient accumulation equivalence, and the same logits as
transformers' LlamaForCausalLM with the same weights."""

import contextlib

import pytest
import torch

from genesis.config import ConfigError, ModelConfig, TrainingConfig, load_config
from genesis.data import get_batch
from genesis.model import Llama, ModelArgs, build_model, check_memory, param_count
from genesis.train import accumulate_gradients, lr_at


def tiny(vocab_size: int = 97, **kw) -> Llama:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, dim=64, n_heads=4, seq_len=32, **kw)
    return Llama(ModelArgs.from_config(cfg, vocab_size=vocab_size))


def test_shapes_and_loss():
    m = tiny()
    x, y = torch.randint(0, 97, (3, 17)), torch.randint(0, 97, (3, 17))
    logits, loss = m(x, y)
    assert logits.shape == (3, 17, 97) and loss.ndim == 0
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5  # near-uniform at init
    assert m(x)[1] is None
    with pytest.raises(ValueError, match="exceeds the model's seq_len 32"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_causal():
    m = tiny().eval()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 1) % 97
    a, b = m(x)[0], m(y)[0]
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-5) and not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2, "rope_theta": 500.0}])
def test_continuations_of_cached_prefixes_read_as_the_whole_sequence(kw):
    """Prefixes run once and kept as keys and values, then continuations against them (several rows per prefix,
    one prefix continued by none), give the hidden states of prefix + continuation run as one sequence; the
    padding after a prefix and after a continuation is random tokens, so that a padded key seen would show."""
    m = tiny(**kw).eval()
    g = torch.Generator().manual_seed(1)
    prefix_lengths, prefix_of, continuation_lengths = [5, 1, 19, 11], [2, 0, 0, 3, 2, 2, 0], [13, 1, 7, 20, 4, 9, 2]
    prefixes = torch.randint(0, 97, (4, 19), generator=g)
    continuations = torch.randint(0, 97, (7, 20), generator=g)
    with torch.no_grad():
        prefix_h, cache = m.read_prefixes(prefixes, torch.tensor(prefix_lengths))
        continued = m.continue_prefixes(continuations, cache, torch.tensor(prefix_of))
        for n, p in enumerate(prefix_lengths):
            assert torch.allclose(prefix_h[n, :p], m.hidden(prefixes[n : n + 1, :p])[0], atol=1e-5)
        for r, (n, c) in enumerate(zip(prefix_of, continuation_lengths)):
            p = prefix_lengths[n]
            whole = m.hidden(torch.cat([prefixes[n, :p], continuations[r, :c]])[None])[0]
            assert torch.allclose(continued[r, :c], whole[p:], atol=1e-5), r
        with pytest.raises(ValueError, match="starts at position 32, past the model's seq_len 32"):
            too_long = cache._replace(lengths=torch.tensor([5, 1, 32, 11]))
            m.continue_prefixes(continuations, too_long, torch.tensor([2]))


def test_ignore_index_targets_do_not_count():
    m = tiny()
    x = torch.randint(0, 97, (2, 10))
    y = x.clone()
    y[:, 5:] = -100
    _, loss = m(x, y)
    _, loss_first = m(x[:, :5], y[:, :5])
    assert torch.allclose(loss, loss_first, atol=1e-5)


def test_tied_and_untied_embeddings_and_gqa():
    tied = tiny()
    assert tied.lm_head.weight.data_ptr() == tied.embed.weight.data_ptr()
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()
    assert untied.num_params() > tiny().num_params()
    gqa = tiny(n_kv_heads=2)
    assert gqa(torch.randint(0, 97, (1, 8)))[0].shape == (1, 8, 97)


def test_gradient_accumulation_matches_one_big_batch(kjv_corpus):
    """4 micro-batches of 2 KJV windows give the gradient of one batch of the 8 (fp32): the losses agree within
    atol=1e-6, and every gradient element within atol=1e-6 + rtol=1e-4 (torch.allclose) of the one-batch gradient."""
    batch = get_batch(kjv_corpus.splits["train"], 8, 24, seed=3, step=0)
    x, y = batch.x, batch.y
    vocab = kjv_corpus.tokenizer.get_vocab_size(with_added_tokens=True)
    big, small = tiny(vocab_size=vocab), tiny(vocab_size=vocab)
    fp32 = contextlib.nullcontext()  # what the trainer uses for fp32
    accumulate_gradients(big, [(x, y)], fp32)
    loss, _, _ = accumulate_gradients(small, [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)], fp32)
    assert torch.allclose(loss, big(x, y)[1].detach(), atol=1e-6, rtol=0)
    for (name, p), q in zip(big.named_parameters(), small.parameters()):
        assert p.grad.abs().max() > 0, name  # real text reaches every parameter
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 97, (2, 16))
    a, b = tiny(), tiny()
    b.grad_checkpointing = True
    a(x, x)[1].backward()
    b(x, x)[1].backward()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_lr_schedule():
    cfg = TrainingConfig(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)


@pytest.mark.parametrize("tie", [True, False])
def test_the_model_is_a_llama_as_transformers_computes_it(tie):
    """The same weights in transformers' LlamaForCausalLM give the same logits: RMSNorm (with a non-default eps),
    rotate-half RoPE (with a non-default theta), grouped-query attention, SwiGLU, tied or untied head. Every weight
    is perturbed, the norm gains too, so a swapped or misnamed tensor shows."""
    pytest.importorskip("transformers")
    from genesis.export import to_transformers

    torch.manual_seed(1)
    a = ModelArgs(vocab_size=101, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, seq_len=32,
                  tie_embeddings=tie, rope_theta=500.0, norm_eps=1e-3)
    ours = Llama(a).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    theirs = to_transformers(ours)  # genesis.export: the one Genesis -> transformers mapping
    tied_there = theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    assert theirs.config.tie_word_embeddings == tie == tied_there
    idx = torch.randint(0, 101, (3, 32))
    with torch.no_grad():
        ours_logits, _ = ours(idx)
        theirs_logits = theirs(idx).logits
    assert ours_logits.abs().max() > 1  # not a degenerate comparison
    torch.testing.assert_close(ours_logits, theirs_logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# The connective-type classification head


def labels_at(shape, positions: dict[tuple[int, int], int]) -> torch.Tensor:
    classes = torch.full(shape, -100, dtype=torch.long)
    for (b, t), c in positions.items():
        classes[b, t] = c
    return classes


def test_class_head_loss_is_the_cross_entropy_at_the_labelled_positions_only():
    from genesis.lexicon import CLASSES
    from genesis.model import ClassLoss

    m = tiny(class_head=True)
    assert m.args.n_classes == len(CLASSES) and torch.equal(m.class_head.bias, torch.zeros(len(CLASSES)))
    with torch.no_grad():
        m.class_head.weight.normal_(0, 1.0)  # a head with opinions, so that argmax and loss are not degenerate
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    where = {(0, 3): 0, (0, 9): 2, (1, 0): 1, (1, 15): 3}
    logits, loss, c = m(x, y, labels_at((2, 16), where))
    assert isinstance(c, ClassLoss) and torch.equal(loss, m(x, y)[1])  # the LM loss is unchanged by the head
    with torch.no_grad():
        head = m.class_head(m.hidden(x))  # (B, T, K)
    rows, cols = zip(*where)
    picked, truth = head[list(rows), list(cols)], torch.tensor(list(where.values()))
    torch.testing.assert_close(c.loss, torch.nn.functional.cross_entropy(picked, truth))
    assert c.count.item() == 4 and c.correct.item() == (picked.argmax(-1) == truth).sum().item()
    # nothing labelled: loss 0 (not nan), and the head still gets a (zero) gradient, as DDP needs every parameter to
    _, _, none = m(x, y, labels_at((2, 16), {}))
    assert none.loss.item() == 0 and none.count.item() == 0
    none.loss.backward()
    assert m.class_head.weight.grad is not None and m.class_head.weight.grad.abs().max() == 0
    with pytest.raises(ValueError, match="no class head"):
        tiny()(x, y, labels_at((2, 16), where))


def test_accumulate_gradients_adds_the_weighted_class_loss():
    """With (x, y, classes) micro-batches the objective is LM loss + class_weight x class loss: the head's
    gradient is class_weight x that of the class loss alone, the returned loss is the LM loss, and the statistics
    are (cross-entropy sum, correct, labelled) over the micro-batches."""
    x, y = torch.randint(0, 97, (4, 16)), torch.randint(0, 97, (4, 16))
    classes = labels_at((4, 16), {(0, 2): 0, (1, 5): 1, (2, 7): 0, (3, 1): 3, (3, 11): 2})
    fp32 = contextlib.nullcontext()
    m = tiny(class_head=True)
    micro_batches = [(x[:2], y[:2], classes[:2]), (x[2:], y[2:], classes[2:])]
    loss, stats, link_stats = accumulate_gradients(m, micro_batches, fp32, 0.25)
    ref = tiny(class_head=True)
    parts = [ref(x[i:i + 2], y[i:i + 2], classes[i:i + 2]) for i in (0, 2)]
    (sum(c.loss for _, _, c in parts) / 2).backward()
    torch.testing.assert_close(m.class_head.weight.grad, 0.25 * ref.class_head.weight.grad)
    torch.testing.assert_close(loss, sum(lm for _, lm, _ in parts).detach() / 2)
    expected = torch.stack([sum(c.loss * c.count for _, _, c in parts), sum(c.correct for _, _, c in parts).float(),
                            torch.tensor(5.0)]).detach()
    torch.testing.assert_close(stats, expected)
    assert torch.equal(link_stats, torch.zeros(3))  # no link head
    # a model without a head: plain (x, y) micro-batches, zero statistics
    _, stats, link_stats = accumulate_gradients(tiny(), [(x, y)], fp32, 0.25)
    assert torch.equal(stats, torch.zeros(3)) and torch.equal(link_stats, torch.zeros(3))


def test_the_class_head_leaves_the_trunk_and_the_random_stream_alone():
    """The same seed gives the same trunk with and without the head, and the same draws after the model is built:
    a run with the head is paired with one without."""
    with_head = tiny(class_head=True)
    draw_after_head = torch.rand(3)
    without = tiny()
    assert torch.equal(draw_after_head, torch.rand(3))
    heads = {k for k in with_head.state_dict() if k.startswith("class_head.")}
    assert heads == {"class_head.weight", "class_head.bias"}
    trunk = with_head.state_dict()
    for name, weight in without.state_dict().items():
        assert torch.equal(trunk[name], weight), name


# ----------------------------------------------------------------------------------------------------------------
# Memory: a lower bound, checked before a run starts


@pytest.mark.parametrize("kw", [{}, dict(tie_embeddings=False), dict(n_kv_heads=2), dict(class_head=True),
                                dict(ffn_dim=96, n_kv_heads=1, tie_embeddings=False)])
def test_param_count_is_what_the_model_holds(kw):
    model = tiny(**kw)
    assert param_count(model.args) == model.num_params()


@pytest.mark.parametrize("name, device, budget_gib", [
    ("cpu.toml", "cpu", 0.5),  # a laptop with little RAM to spare
    ("high_vram.toml", "cuda", 12),  # the cards each config is sized for, with nothing else on them
    ("low_vram.toml", "cuda", 4),
    ("high_vram.toml", "cpu", 8),  # the GPU configs on a CPU (fp32): the README says they still run
])
def test_the_shipped_configs_are_not_refused_where_they_are_meant_to_run(name, device, budget_gib):
    cfg = load_config(name)
    check_memory(cfg, cfg.tokenizer.vocab_size, torch.device(device), free=int(budget_gib * 2**30))
    with pytest.raises(ConfigError, match=r"need at least .* but (cuda|the CPU) has"):  # a fifth is refused
        check_memory(cfg, cfg.tokenizer.vocab_size, torch.device(device), free=int(budget_gib * 2**30 / 5))


def test_a_model_or_batch_that_cannot_fit_is_one_line_naming_the_set():
    cfg = load_config("cpu.toml", overrides=["model.dim=1000000000000", "model.n_heads=1"])
    with pytest.raises(ConfigError) as err:
        check_memory(cfg, 8000, torch.device("cpu"), free=16 * 2**30)
    assert str(err.value) == ("--set model.dim=1000000000000: model: 1.60e+25 parameters need at least 2.38e+17 GiB "
                              "for their weights, gradients and AdamW state (16 B each), but the CPU has 16.0 GiB of "
                              "RAM available; make the model smaller (model.dim, model.n_layers, model.ffn_dim)")
    cfg = load_config("high_vram.toml", overrides=["training.micro_batch=64"])
    with pytest.raises(ConfigError) as err:
        check_memory(cfg, 8000, torch.device("cuda", 0), free=12 * 2**30)
    assert str(err.value) == ("--set training.micro_batch=64: training.micro_batch: 64 x 1024 tokens need at least "
                              "12.1 GiB of activations besides 1.8 GiB for the parameters, gradients and AdamW state, "
                              "but cuda:0 has 12.0 GiB free; lower training.micro_batch (raise training.grad_accum to "
                              "keep the step) or model.seq_len, or set training.grad_checkpointing = true")
    cfg = load_config("cpu.toml")  # nothing set on the command line: the file is named
    with pytest.raises(ConfigError) as err:
        check_memory(cfg, 8000, torch.device("cpu"), free=2**20)
    assert str(err.value).startswith(f"{cfg.source}: model: 1.9 M parameters need at least 28.6 MiB for their "
                                     f"weights, gradients and AdamW state (16 B each), but the CPU has 1.0 MiB of RAM")


def test_an_allocation_that_fails_while_building_the_model_is_one_line():
    cfg = load_config("cpu.toml", overrides=["model.dim=1000000000000", "model.n_heads=1"])
    with pytest.raises(ConfigError) as err:
        build_model(ModelArgs.from_config(cfg.model, 8000), torch.device("cpu"), cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith("--set model.dim=1000000000000: model: 1.60e+25 parameters "
                                                      "cannot be allocated on cpu ("), message
