"""The checkout works as users run it: from its root, other distributions' top-level packages are not shadowed, and
the Trainer and Lightning examples of docs/integrations.md train with the masker."""

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT

PY_SOURCES = [*ROOT.glob("genesis/**/*.py"), *ROOT.glob("kernels/**/*.py"), *ROOT.glob("bench/**/*.py"),
              *ROOT.glob("tests/**/*.py"), *ROOT.glob("configs/**/*.py")]


def _python_in_root(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -c code` with the checkout root as the working directory, as `python -c` or a notebook there runs."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_the_checkout_has_no_top_level_kernels_package():
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py makes the checkout shadow `kernels`"
    for path in PY_SOURCES:
        text = path.read_text()
        assert not re.search(r"^\s*(import kernels\b|from kernels\b)", text, re.M), f"{path} imports top-level kernels"


def test_an_installed_kernels_distribution_wins_from_the_checkout_root():
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("no `kernels` distribution installed")
    proc = _python_in_root("import kernels; print(kernels.__file__)")
    assert proc.returncode == 0, proc.stderr
    found = Path(proc.stdout.strip()).resolve()
    assert ROOT / "kernels" not in found.parents, f"`import kernels` found the checkout's {found}"
    assert Path(dist.locate_file("")).resolve() in found.parents


def test_transformers_imports_from_the_checkout_root():
    pytest.importorskip("transformers")
    proc = _python_in_root("from transformers import LlamaForCausalLM; import genesis.kernels.mask; print('ok')")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


_EXAMPLE_SETUP = '''
import torch

from genesis.corpus import load_corpus
from genesis.masking import ConnectiveMasker
from genesis.tokenizer import train_bpe

verses = load_corpus("kjv")[:2000]
tokenizer = train_bpe([v.text + "\\n" for v in verses], vocab_size=1000)
ids = torch.tensor(tokenizer.encode("".join(v.text + "\\n" for v in verses)).ids)
T = 64
rows = [ids[i : i + T] for i in range(0, 32 * T, T)]


class CountingMasker(ConnectiveMasker):
    """The masker, counting what it masks and the (step, row_offset) of each call."""

    def __call__(self, input_ids, step, *args, **kwargs):
        out = super().__call__(input_ids, step, *args, **kwargs)
        self.seen.append((step, kwargs.get("row_offset", 0), int(out.mask.sum())))
        return out


masker = CountingMasker.from_tokenizer(tokenizer, strategy="uniform", mask_prob=1.0, log=None)
masker.seen = []
torch.manual_seed(0)
'''

_TRAINER_SETUP = _EXAMPLE_SETUP + '''
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

dataset = [{"input_ids": r, "labels": r.clone()} for r in rows]
config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=T)
model = LlamaForCausalLM(config)
args = TrainingArguments(output_dir="{out}", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         max_steps=3, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                         disable_tqdm=True)
'''

_LIGHTNING_SETUP = _EXAMPLE_SETUP + '''
import lightning as L


class LitLM(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(tokenizer.get_vocab_size(), 16)
        self.head = torch.nn.Linear(16, tokenizer.get_vocab_size())

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.head(self.embedding(x[:, :-1]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


lit_module = LitLM()
train_loader = torch.utils.data.DataLoader([(r, r.clone()) for r in rows], batch_size=4)
'''

# every optimizer step masks connectives (all of them: mask_prob 1), and the second micro-batch of a step continues
# the first's rows (row_offset 4)
_ACCUMULATED_STEPS = [(0, 0), (0, 4), (1, 0), (1, 4), (2, 0), (2, 4)]


def _masker_calls(stdout: str) -> list[tuple[int, int, int]]:
    seen = eval(stdout.split("seen", 1)[1])
    assert [(step, offset) for step, offset, _ in seen] == _ACCUMULATED_STEPS
    assert all(sum(masked for s, _, masked in seen if s == step) > 0 for step in range(3))
    return seen


def test_docs_trainer_example_trains_from_the_checkout_root(tmp_path):
    """docs/integrations.md's `ConnectiveMaskingTrainer` lines, verbatim, train a transformers Llama for 3 steps of 2
    micro-batches, run from the checkout root."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from .test_readme import example_block

    code = (_TRAINER_SETUP.replace("{out}", str(tmp_path / "out")) + example_block("trainer-example")
            + "print('seen', masker.seen)\n")
    proc = _python_in_root(code, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _masker_calls(proc.stdout)


def test_docs_lightning_example_trains(tmp_path):
    """docs/integrations.md's Lightning lines, verbatim but for max_steps (3), train a LightningModule on (x, y)
    batches for 3 steps of 2 micro-batches."""
    pytest.importorskip("lightning")
    from .test_readme import example_block

    example = example_block("lightning-example")
    assert "max_steps=1000" in example
    script = tmp_path / "example.py"
    script.write_text(_LIGHTNING_SETUP + example.replace("max_steps=1000", "max_steps=3")
                      + "print('seen', masker.seen)\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    _masker_calls(proc.stdout)


def test_triton_is_an_extra_and_every_console_script_names_a_main():
    """A CPU install needs no Triton (~1 GB; torch's CUDA wheels bring it where it can run); [dev] keeps it for
    the kernel tests. Each console script points at a callable."""
    import importlib

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("triton")]
    for extra in ("triton", "dev"):
        assert [d for d in project["optional-dependencies"][extra] if d.startswith("triton")], extra
    scripts = project["scripts"]
    assert set(scripts) == {f"genesis-{name}" for name in ("train", "evaluate", "compare", "export", "sample", "plot")}
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target
