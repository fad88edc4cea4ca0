"""The README stays true: its plug-in example runs, its commands name real configs, CI runs its test command."""

import re
import subprocess
import sys

from .helpers import ROOT

README = (ROOT / "README.md").read_text()


def example_block(name: str) -> str:
    """The Python block between `<!-- name -->` and `<!-- /name -->`, in the README or a page of docs/."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        block = re.search(rf"<!-- {name} -->\n```python\n(.*?)```\n<!-- /{name} -->", page.read_text(), re.S)
        if block:
            return block.group(1)
    raise AssertionError(f"no page holds the {name} markers")


def test_plugin_example_runs(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(example_block("plugin-example"))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "words resolved into" in proc.stdout and "masked tokens" in proc.stdout


def test_class_head_example_trains_a_head_of_your_own(kjv_tokenizer):
    """The README's class-head snippet, in the loop of a model that is not Genesis's (its hidden state: an embedding
    of the token before): the snippet builds the head once, then its loss lines run every step; the head learns the
    masked connectives' classes from the punctuation before them (its loss falls) and counts the masked tokens."""
    import torch

    from genesis.masking import ConnectiveMasker

    lines = example_block("class-head-example").splitlines()
    build = next(i for i, line in enumerate(lines) if line.startswith("head = "))
    setup, per_step = "\n".join(lines[: build + 1]), "\n".join(lines[build + 1 :])
    text = "And he said, Therefore ye shall go; but they would not, for they feared. Then they went.\n" * 6
    x = torch.tensor([kjv_tokenizer.encode(text).ids[:96]] * 4)
    masker = ConnectiveMasker.from_tokenizer(kjv_tokenizer, strategy="uniform", mask_prob=0.5, log=None)
    torch.manual_seed(0)
    trunk = torch.nn.Embedding(kjv_tokenizer.get_vocab_size(), 32)
    namespace = {"torch": torch, "hidden_size": 32}
    exec(setup, namespace)
    optimizer = torch.optim.Adam([*trunk.parameters(), *namespace["head"].parameters()], lr=0.05)
    losses = []
    for step in range(30):
        out = masker(x, step=step)
        namespace.update(hidden=trunk(out.input_ids.roll(1, dims=1)), out=out, lm_loss=torch.zeros(()))
        exec(per_step, namespace)
        namespace["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        c = namespace["c"]
        assert c.count.item() == out.mask.sum().item() > 0
        losses.append(c.loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_readme_commands_name_shipped_configs():
    for name in set(re.findall(r"--config (\w+\.toml)", README)):
        assert (ROOT / "configs" / name).is_file(), name


def test_ci_runs_the_readme_test_command():
    test_cmd = re.search(r"## Test\n\n```bash\n(.+?)\n```", README).group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()
    assert "pip install --quiet torch==2.13.0" in ci  # the CPU wheel before anything can pull a CUDA build
