"""Config loading: shipped configs by bare name, precedence, presets and one-line errors."""


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
        ("[masking]\nstrategy = 'random'\n", "masking.strategy", "must be one of uniform, weighted, structural"),
        ("[masking]\nbert_split = [0.5, 0.1, 0.1]\n", "masking.bert_split", "must sum to 1"),
        ("[[masking.rules]]\np = 1.5\n", "masking.rules[0].p", "must be in [0, 1]"),
        ("[masking.connectives.hence]\nweight = 0.5\nclass = 'causl'\n", "masking.connectives.hence.class",
         "must be one of causal"),
        ("[training]\nsteps = true\n", "training.steps", "expected an integer"),
        ("[data]\nheldout_every = 1\n", "data.heldout_every", "must be >= 2"),
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
    with pytest.raises(ConfigError, match=r"^--set training\.stepz=3: training\.stepz: unknown key"):
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
    assert "# masking.strategy = 'weighted'  # uniform | weighted | structural" in proc.stdout
