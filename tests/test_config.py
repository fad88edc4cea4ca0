"""Config loading: shipped configs by bare name, precedence, presets and one-line errors."""


import re

import pytest

from genesis.config import ConfigError, load_config, parse_override, to_toml

from .helpers import run_cli


def write(tmp_path, text, name="bad.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_shipped_configs_load_by_bare_name():
    hv = load_config("high_vram.toml")
    model = hv.model
    assert (model.n_layers, model.dim, model.n_heads, model.ffn_dim, model.seq_len) == (12, 768, 12, 3072, 1024)
    assert (hv.training.micro_batch, hv.training.grad_accum, hv.training.dtype) == (4, 4, "bf16")
    assert hv.tokenizer.vocab_size == 8000
    lv = load_config("low_vram")
    assert lv.training.grad_checkpointing and lv.training.micro_batch < hv.training.micro_batch
    cpu = load_config("cpu.toml")
    assert cpu.training.device == "cpu" and cpu.model.dim <= 256


def test_precedence_defaults_file_mode_set(tmp_path):
    path = write(tmp_path, "[model]\ndim = 64\nn_heads = 2\n[training]\nsteps = 7\n", "mine.toml")
    cfg = load_config(path)
    assert (cfg.model.dim, cfg.training.steps, cfg.training.lr) == (64, 7, 3e-4)  # file over defaults
    cfg = load_config(path, mode="microscope")
    assert (cfg.model.dim, cfg.model.n_layers, cfg.training.steps) == (768, 12, 7)  # mode over file
    cfg = load_config(path, mode="microscope", overrides=["model.dim=384", "training.lr=1e-3"])
    assert (cfg.model.dim, cfg.training.lr) == (384, 1e-3)  # --set over mode
    assert cfg.name == "mine-microscope"


def test_file_defined_mode(tmp_path):
    path = write(tmp_path, "[modes.small.model]\ndim = 32\nn_heads = 2\n")
    assert load_config(path, mode="small").model.dim == 32
    with pytest.raises(ConfigError, match=r"mode: unknown mode 'nope' \(known: microscope, small, tiny\)"):
        load_config(path, mode="nope")


@pytest.mark.parametrize("text, key, reason", [
    ("[modes]\nsmall = 3\n", "modes.small", "expected a table with [modes.small.model] and/or"),
    ("[modes.small]\nmodel = 3\n", "modes.small.model", "expected a table of model keys, got 3"),
    ("[modes.small.data]\ncorpus = 'asv'\n", "modes.small", "presets may set model and training keys only"),
    ("modes = 3\n", "modes", "expected a table of [modes.NAME] presets"),
])
@pytest.mark.parametrize("mode", [None, "small", "microscope"])
def test_bad_file_modes_name_the_file(tmp_path, text, key, reason, mode):
    """A malformed [modes] table is the file's mistake, whichever --mode is asked for (or none)."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, mode=mode)
    assert str(err.value).startswith(f"{path}: {key}: {reason}"), str(err.value)


def test_config_knows_where_each_value_came_from(tmp_path):
    path = write(tmp_path, "[model]\ndim = 64\nn_heads = 2\n", "mine.toml")
    cfg = load_config(path, mode="tiny", overrides=["training.steps=3", 'data.heldout_books=["Jude"]'])
    assert cfg.origin_of("data.heldout_books") == '--set data.heldout_books=["Jude"]'
    assert cfg.origin_of("training.steps") == "--set training.steps=3"
    assert cfg.origin_of("model.seq_len") == "--mode tiny"
    assert cfg.origin_of("data.corpus") == path
    assert load_config("cpu.toml").origin_of("model.seq_len").endswith("cpu.toml")


@pytest.mark.parametrize(
    "text, key, reason",
    [
        ("[modle]\ndim = 3\n", "modle", "unknown section"),
        ("[model]\ndimm = 3\n", "model.dimm", "unknown key"),
        ("[model]\ndim = 'big'\n", "model.dim", "expected an integer, got 'big'"),
        ("[training]\nlr = -1.0\n", "training.lr", "must be > 0"),
        ("[model]\ndim = 100\nn_heads = 3\n", "model.dim", "must be divisible by n_heads"),
        ("[masking]\nstrategy = 'shuffled'\n", "masking.strategy",
         "must be one of uniform, weighted, structural, random"),
        ("[masking]\nbert_split = [0.5, 0.1, 0.1]\n", "masking.bert_split", "must sum to 1"),
        ("[[masking.rules]]\np = 1.5\n", "masking.rules[0].p", "must be in [0, 1]"),
        ("[masking.connectives.hence]\nweight = 0.5\nclass = 'causl'\n", "masking.connectives.hence.class",
         "must be one of causal"),
        ("[training]\nsteps = true\n", "training.steps", "expected an integer"),
        ("[data]\nheldout_every = 1\n", "data.heldout_every", "must be >= 2"),
        ("[training]\nsteps = 4294967296\n", "training.steps", "must be < 2**32, the range of the masker's 32-bit"),
        ("training = 5\n", "training", "expected a table ([training]), got 5"),
        ("[training]\nkeep_checkpoints = -1\n", "training.keep_checkpoints", "must be >= 0 (got -1)"),
        ("[training]\nskip_nonfinite = -2\n", "training.skip_nonfinite", "must be >= 0 (got -2)"),
    ],
)
def test_bad_values_name_file_key_reason(tmp_path, text, key, reason):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {key}: "), msg
    assert reason in msg


def test_bad_override_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match=r"^--set training\.stepz=3: training\.stepz: unknown key; did you mean "
                                          r"'steps'\? \(valid keys: "):
        load_config("cpu.toml", overrides=["training.stepz=3"])
    with pytest.raises(ConfigError, match=r"^--set model\.dim=130: model\.dim: must be divisible by n_heads"):
        load_config("cpu.toml", overrides=["model.dim=130"])
    with pytest.raises(ConfigError, match="an override must look like section.key=value"):
        load_config("cpu.toml", overrides=["training.steps"])
    path = write(tmp_path, "[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config not found"):
        load_config("no_such_config.toml")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}: is a directory, not a config file "):
        load_config(str(tmp_path))


def test_override_values_are_toml():
    assert parse_override("masking.enabled=true") == ("masking.enabled", True)
    assert parse_override("training.lr=1e-3") == ("training.lr", 1e-3)
    assert parse_override("data.corpus=asv") == ("data.corpus", "asv")
    assert parse_override('data.heldout_books=["Jude"]') == ("data.heldout_books", ["Jude"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("cpu.toml", overrides=["masking.strategy=structural", "masking.connectives.hence.weight=0.9"])
    path = write(tmp_path, to_toml(cfg), "resolved.toml")
    again = load_config(path)
    for section in ("data", "tokenizer", "model", "training", "masking"):
        assert getattr(again, section) == getattr(cfg, section)


def test_cli_config_error_is_one_line_without_traceback(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 0\n")
    proc = run_cli("genesis.train", "--config", path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {path}: training.steps: must be >= 1 (got 0)"
    assert "Traceback" not in proc.stderr + proc.stdout


def test_show_config_lists_keys_with_docs():
    proc = run_cli("genesis.train", "--config", "cpu.toml", "--show-config")
    assert "[masking]" in proc.stdout
    assert '# masking.strategy = "weighted"  # uniform | weighted | structural' in proc.stdout
    assert "# masking.default_connectives = true  # " in proc.stdout and "# masking.seed = (unset)  # " in proc.stdout


@pytest.mark.parametrize("text, key", [
    ("training.seed=-1", "training.seed"),
    ("training.seed=9223372036854775808", "training.seed"),
    ("training.seed=18446744073709551616", "training.seed"),
    ("masking.seed=-1", "masking.seed"),
    ("masking.seed=9223372036854775808", "masking.seed"),
])
def test_seeds_out_of_range_fail_in_config(text, key):
    with pytest.raises(ConfigError) as err:
        load_config("cpu.toml", overrides=[text])
    assert str(err.value).startswith(f"--set {text}: {key}: must be in [0, 2**63) (got "), str(err.value)


def test_seed_range_is_what_every_consumer_accepts():
    """[0, 2**63): numpy's SeedSequence needs >= 0, torch.manual_seed < 2**64, the masking Philox key < 2**63."""
    import numpy as np
    import torch

    top = 2**63 - 1
    cfg = load_config("cpu.toml", overrides=[f"training.seed={top}", f"masking.seed={top}"])
    assert cfg.training.seed == cfg.masking.seed == top
    assert load_config("cpu.toml", overrides=["training.seed=0", "masking.seed=0"]).masking.seed == 0
    torch.manual_seed(top)
    np.random.SeedSequence([top, 0, 0, 0, 0x6E5])


@pytest.mark.parametrize("mode, overrides, where, rest", [
    (None, ["trainin.steps=1"], "--set trainin.steps=1", "trainin: unknown section"),
    (None, ["masking.rules=[{p=2}]"], "--set masking.rules=[{p=2}]", "masking.rules[0].p: must be in [0, 1]"),
    (None, ["masking.rules[0].p=0.5"], "--set masking.rules[0].p=0.5",
     "masking.rules[0].p: a --set cannot index into a list; set the whole list, e.g. masking.rules=[...]"),
    (None, ["masking.connectives.hence.class=x"], "--set masking.connectives.hence.class=x",
     "masking.connectives.hence.class: must be one of"),
    # cross-field checks: every --set or --mode that set one of the keys involved
    (None, ["training.steps=5", "training.lr=1e-4"], "--set training.lr=1e-4",
     "training.min_lr: must be in [0, lr=0.0001]"),
    (None, ["model.n_heads=5"], "--set model.n_heads=5", "model.dim: must be divisible by n_heads"),
    ("tiny", ["model.n_heads=5"], "--mode tiny, --set model.n_heads=5", "model.dim: must be divisible by n_heads"),
    (None, ["masking.strategy=structural", "masking.rules=[]"],
     "--set masking.strategy=structural, --set masking.rules=[]", "masking.rules: structural masking needs"),
    (None, ["model.n_kv_heads=3"], "--set model.n_kv_heads=3", "model.n_kv_heads: must divide n_heads=4"),
])
def test_set_errors_name_the_set(mode, overrides, where, rest):
    with pytest.raises(ConfigError) as err:
        load_config("cpu.toml", mode=mode, overrides=overrides)
    assert str(err.value).startswith(f"{where}: {rest}"), str(err.value)


def test_errors_the_set_did_not_cause_name_the_file(tmp_path):
    path = write(tmp_path, "[training]\nlr = 1e-5\n[trainin]\nsteps = 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides=["training.steps=3", "training.seed=1"])
    assert str(err.value).startswith(f"{path}: trainin: unknown section"), str(err.value)
    path = write(tmp_path, "[training]\nlr = 1e-5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides=["training.steps=3", "training.seed=1"])
    assert str(err.value).startswith(f"{path}: training.min_lr: must be in [0, lr=1e-05]"), str(err.value)


def test_a_non_table_section_is_the_file_s_fault_whatever_is_set_into_it(tmp_path):
    """`training = 5` in the file: a --set training.steps (or a --mode over training) is not to blame."""
    path = write(tmp_path, "training = 5\n")
    for mode, overrides in ((None, ["training.steps=3"]), ("tiny", []), (None, ["model.dim=64"])):
        with pytest.raises(ConfigError) as err:
            load_config(path, mode=mode, overrides=overrides)
        assert str(err.value) == f"{path}: training: expected a table ([training]), got 5", (mode, overrides)


def test_steps_stay_below_2_to_the_32():
    """Masks are keyed by the step as a 32-bit counter word (held-out masks use 2**32 - 1, past the last step)."""
    assert load_config("cpu.toml", overrides=[f"training.steps={2**32 - 1}"]).training.steps == 2**32 - 1
    with pytest.raises(ConfigError) as err:
        load_config("cpu.toml", overrides=["training.steps=100000000000000000000"])
    assert str(err.value) == ("--set training.steps=100000000000000000000: training.steps: must be < 2**32, the range "
                              "of the masker's 32-bit step counter (got 100000000000000000000)")


def test_a_later_set_of_a_table_replaces_the_origins_inside_it():
    first, second = "masking.connectives.hence.weight=0.9", "masking.connectives={hence = {weight = 0.5}}"
    cfg = load_config("cpu.toml", overrides=[first, second])
    assert cfg.origin_of("masking.connectives.hence.weight") == f"--set {second}"
    assert cfg.origin_of("masking.rules[1].p").endswith("cpu.toml")
    cfg = load_config("cpu.toml", overrides=["masking.rules=[{p=0.5}]"])
    assert cfg.origin_of("masking.rules[0].p") == "--set masking.rules=[{p=0.5}]"


def test_presets_are_never_changed_by_overrides():
    import copy

    from genesis.config import MODES

    before = copy.deepcopy(MODES)
    assert load_config(None, "tiny", ["model.dim=64", "training.micro_batch=2"]).model.dim == 64
    assert load_config(None, "tiny").model.dim == 128
    assert load_config(None, "microscope", ["model.n_layers=2"]).model.n_layers == 2
    assert MODES == before


@pytest.mark.parametrize("text, key, reason", [
    ("[modes.foo.model]\nbogus = 1\n", "modes.foo.model.bogus", "unknown key (valid keys: class_head, dim, ffn_dim"),
    ("[modes.foo.training]\nsteps = 'many'\n", "modes.foo.training.steps", "expected an integer, got 'many'"),
    ("[modes.foo.training]\ngrad_checkpointing = 1\n", "modes.foo.training.grad_checkpointing",
     "expected true or false, got 1"),
    ("[modes.foo.training]\ncompile = 1\n", "modes.foo.training.compile", "expected true, false or a string, got 1"),
])
@pytest.mark.parametrize("mode", [None, "tiny", "foo"])
def test_every_file_preset_is_checked_when_the_file_loads(tmp_path, text, key, reason, mode):
    path = write(tmp_path, "[modes.ok.model]\ndim = 64\n" + text)
    with pytest.raises(ConfigError) as err:
        load_config(path, mode=mode)
    assert str(err.value).startswith(f"{path}: {key}: {reason}"), str(err.value)


def test_bad_values_in_a_used_file_preset_name_the_file(tmp_path):
    path = write(tmp_path, "[model]\nn_heads = 4\n[modes.foo.training]\nsteps = 0\n[modes.bar.model]\ndim = 90\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, mode="foo")
    assert str(err.value) == f"{path}: modes.foo.training.steps: must be >= 1 (got 0)"
    with pytest.raises(ConfigError) as err:
        load_config(path, mode="bar")
    assert str(err.value).startswith(f"{path}: modes.bar.model.dim: must be divisible by n_heads"), str(err.value)
    with pytest.raises(ConfigError) as err:  # the --set is involved: it is named
        load_config(path, mode="bar", overrides=["model.n_heads=18"])
    assert str(err.value).startswith("--set model.n_heads=18: model.dim: dim / n_heads must be even"), str(err.value)
    assert load_config(path, mode="bar", overrides=["model.n_heads=5"]).origin_of("model.dim") == path


CONTROL = "".join(map(chr, range(0x20))) + "\x7f"


def test_resolved_config_round_trips_any_string_and_key(tmp_path):
    from genesis.config import ConnectiveEntry

    cfg = load_config("cpu.toml", overrides=['masking.verse_separator="\\r\\n"'])
    assert cfg.masking.verse_separator == "\r\n"
    path = write(tmp_path, to_toml(cfg), "resolved.toml")
    assert load_config(path).masking.verse_separator == "\r\n"

    text = CONTROL + '"quoted" \'single\' back\\slash \\n \\u0041 """ naïve ἀρχῇ 🕊 \u2028 end'
    cfg.masking.verse_separator = text
    cfg.masking.clause_punctuation = "\\" + CONTROL
    cfg.tokenizer.mask_token = '"'
    cfg.training.out_dir = "C:\\runs\\" + "\t"
    keys = ['say "so"', "a.b", "", "naïve", "back\\slash", "tab\tkey", "two words", "so", "x-y_1", "[", "#"]
    keys += list(CONTROL)
    cfg.masking.connectives = {k: ConnectiveEntry(weight=0.25, cls="additive") for k in keys}
    path = write(tmp_path, to_toml(cfg), "resolved.toml")
    again = load_config(path)
    for section in ("data", "tokenizer", "model", "training", "masking"):
        assert getattr(again, section) == getattr(cfg, section)
    assert list(again.masking.connectives) == keys
    assert " x-y_1 = { weight = 0.25" in to_toml(cfg)  # bare where TOML allows it


def test_unknown_heldout_book_suggests_close_corpus_names():
    from genesis.config import DataConfig
    from genesis.corpus import Verse
    from genesis.data import split_verses

    verses = [Verse(book, c, 1, "text") for book in ("Genesis", "Jude", "Revelation of John") for c in range(1, 30)]
    cfg = DataConfig(heldout_books=["Revelation", "Zzyzx", "genesis"])
    with pytest.raises(ConfigError) as err:
        split_verses(verses, cfg, lambda key: "mine.toml")
    assert str(err.value) == ("mine.toml: data.heldout_books: not in the corpus: Revelation (did you mean "
                              "'Revelation of John'?), Zzyzx, genesis (did you mean 'Genesis'?)")
    verses += [Verse(book, 1, 1, "text") for book in ("Judges", "James")]
    with pytest.raises(ConfigError, match=r"^data.heldout_books: not in the corpus: Judas \(did you mean "
                                          r"'Judges', 'Jude' or 'James'\?\)$"):
        split_verses(verses, DataConfig(heldout_books=["Judas"]))


def test_keys_their_switch_leaves_unread_get_one_warning_each(capsys, tmp_path, monkeypatch):
    import genesis.config

    monkeypatch.setattr(genesis.config, "_idle_warned", set())  # said once per process: this test's own process
    load_config("cpu.toml", overrides=["masking.adapt_up=1.5", "masking.plateau_window=5", "masking.chain_gap=32",
                                       "masking.schedule_steps=100"])
    assert sorted(capsys.readouterr().err.splitlines()) == [
        "warning: --set masking.adapt_up=1.5: masking.adapt_up has no effect while masking.adaptive = false",
        "warning: --set masking.chain_gap=32: masking.chain_gap has no effect while masking.chain = false",
        "warning: --set masking.plateau_window=5: masking.plateau_window has no effect while masking.schedule = "
        "\"constant\"",
        "warning: --set masking.schedule_steps=100: masking.schedule_steps has no effect while masking.schedule = "
        "\"constant\""]
    # a comparison turns the switches on over one base config: the keys waiting for them load (said once per
    # process, not once per run), and then count
    base = load_config("cpu.toml", overrides=["masking.enabled=true", "masking.chain_gap=40"])
    assert capsys.readouterr().err.count("\n") == 1
    load_config("cpu.toml", overrides=["masking.enabled=true", "masking.chain_gap=40", "training.seed=2"])
    assert capsys.readouterr().err == ""
    chained = load_config("cpu.toml", overrides=["masking.enabled=true", "masking.chain_gap=40", "masking.chain=true"])
    assert capsys.readouterr().err == "" and chained.masking.chain_gap == 40 and not base.masking.chain
    path = tmp_path / "mine.toml"  # set in a file: the file is named
    path.write_text("[masking]\nenabled = true\nadapt_low = 0.3\n")
    load_config(str(path))
    assert capsys.readouterr().err.strip() == f"warning: {path}: masking.adapt_low has no effect while " \
                                              "masking.adaptive = false"
    load_config("cpu.toml", overrides=["masking.enabled=true", "masking.strategy=weighted", "masking.adaptive=true",
                                       "masking.adapt_up=1.5", "masking.schedule=plateau", "masking.schedule_steps=10",
                                       "masking.plateau_window=5"])
    for name in ("cpu.toml", "high_vram.toml", "low_vram.toml", "research_cpu.toml", "research_gpu.toml"):
        load_config(name)
    saved = tmp_path / "saved.toml"  # a run's saved config holds every key, at its default where not set
    saved.write_text(to_toml(load_config("cpu.toml")))
    assert "adapt_up" in saved.read_text() and "plateau_window" in saved.read_text()
    load_config(str(saved))
    assert capsys.readouterr().err == ""  # the switches on, and the shipped configs: nothing to say


@pytest.mark.parametrize("overrides, key, reason", [
    (["masking.adaptive=true"], "masking.adaptive",
     "adapts the connectives' weights, which strategy = \"random\" (the control arm) does not mask"),
    (["masking.chain=true"], "masking.chain",
     "chains causal connectives, which strategy = \"random\" (the control arm) does not mask"),
    (["model.class_head=true"], "model.class_head",
     "learns the class of masked connectives, and strategy = \"random\" (the control arm) masks other words"),
    (["training.connective_loss_weight=2.0"], "training.connective_loss_weight",
     "weights the connectives the masker finds, and under strategy = \"random\" (the control arm) it finds the "
     "control words"),
    (["masking.control_reference=random"], "masking.control_reference",
     "must be one of uniform, weighted, structural (got 'random')"),
])
def test_the_random_control_arm_refuses_what_it_cannot_mean(overrides, key, reason):
    """Each combination that makes no sense with the control arm is one config error line naming the --set."""
    with pytest.raises(ConfigError) as e:
        load_config("cpu.toml", overrides=["masking.enabled=true", "masking.strategy=random", *overrides])
    message = str(e.value)
    assert "\n" not in message and f": {key}: {reason}" in message and message.startswith("--set ")
    assert load_config("cpu.toml", overrides=["masking.enabled=true", "masking.strategy=random"]).masking.strategy \
        == "random"


def test_control_reference_without_the_random_strategy_is_an_idle_key(capsys, monkeypatch):
    import genesis.config

    monkeypatch.setattr(genesis.config, "_idle_warned", set())
    load_config("cpu.toml", overrides=["masking.control_reference=uniform"])
    assert capsys.readouterr().err.strip() == ("warning: --set masking.control_reference=uniform: "
                                               "masking.control_reference has no effect while masking.strategy = "
                                               "\"weighted\"")
    load_config("cpu.toml", overrides=["masking.strategy=random", "masking.control_reference=uniform"])
    assert capsys.readouterr().err == ""
