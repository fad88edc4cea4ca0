"""The README stays true: its plug-in example runs, its commands name real configs, CI runs its test command."""

import re
import subprocess
import sys

from .helpers import ROOT

README = (ROOT / "README.md").read_text()


def test_plugin_example_runs(tmp_path):
    block = re.search(r"<!-- plugin-example -->\n```python\n(.*?)```\n<!-- /plugin-example -->", README, re.S)
    assert block, "the README lost its plug-in example markers"
    script = tmp_path / "example.py"
    script.write_text(block.group(1))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "words resolved into" in proc.stdout and "masked tokens" in proc.stdout


def test_readme_commands_name_shipped_configs():
    for name in set(re.findall(r"--config (\w+\.toml)", README)):
        assert (ROOT / "configs" / name).is_file(), name


def test_ci_runs_the_readme_test_command():
    test_cmd = re.search(r"## Test\n\n```bash\n(.+?)\n```", README).group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()
    assert "pip install --quiet torch==2.13.0" in ci  # the CPU wheel before anything can pull a CUDA build
