"""The README and docs/ stay true: their examples run, their commands name real configs, CI runs the README's test
command, and their relative links lead to files and headings that exist."""

import re
import subprocess
import sys

from .helpers import ROOT

README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def example_block(name: str) -> str:
    """The Python block between `<!-- name -->` and `<!-- /name -->`, in the README or a page of docs/."""
    for page in PAGES:
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


def test_readme_and_docs_commands_name_shipped_configs():
    for page in PAGES:
        for name in set(re.findall(r"--config (\w+\.toml)", page.read_text())):
            assert (ROOT / "configs" / name).is_file(), f"{page.name}: {name}"


def _anchors(page) -> set[str]:
    """The heading anchors GitHub gives a Markdown page (headings inside code blocks do not count)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    headings = re.findall(r"^#{1,6} +(.+?) *$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_relative_links_in_readme_and_docs_resolve():
    broken = []
    for page in [*PAGES, ROOT / "bench" / "RESULTS.md"]:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_ci_runs_the_readme_test_command():
    test_cmd = re.search(r"## Test\n\n```bash\n(.+?)\n```", README).group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()
    assert "pip install --quiet torch==2.13.0" in ci  # the CPU wheel before anything can pull a CUDA build
