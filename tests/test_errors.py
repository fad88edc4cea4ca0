"""The error base and the one place a command line turns an error into its line."""

import errno

import pytest

from genesis.compare import CompareError
from genesis.config import ConfigError
from genesis.corpus import CorpusError
from genesis.errors import ERROR_EXIT, GenesisError, RunError, run_cli
from genesis.evaluate import EvalError
from genesis.export import ExportError
from genesis.masking import MaskingError
from genesis.plot import PlotError
from genesis.sample import SampleError
from genesis.tokenizer import TokenizerError


@pytest.mark.parametrize("cls", [RunError, CorpusError, TokenizerError, PlotError, SampleError, ConfigError,
                                 MaskingError, EvalError, CompareError, ExportError])
def test_every_project_error_derives_from_the_base(cls):
    assert issubclass(cls, GenesisError)


def test_a_project_error_is_one_line_with_status_2(capsys):
    def body():
        raise CorpusError("kjv.sqlite: not a corpus")

    assert run_cli(body) == ERROR_EXIT
    assert capsys.readouterr().err == "error: kjv.sqlite: not a corpus\n"


def test_an_os_error_names_its_file():
    said = []

    def body():
        raise PermissionError(errno.EACCES, "Permission denied", "/runs/x")

    assert run_cli(body, said.append) == ERROR_EXIT
    assert said == ["error: /runs/x: Permission denied"]


def test_the_body_status_and_other_exceptions_pass_through():
    assert run_cli(lambda: 7) == 7
    with pytest.raises(KeyboardInterrupt):
        run_cli(lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(ZeroDivisionError):  # a bug is a traceback, not a line
        run_cli(lambda: 1 / 0)


def test_a_broken_pipe_is_status_141_quietly_or_with_the_callers_line(monkeypatch):
    """`... | head`: the reader left; stdout goes to /dev/null (reader_gone, stubbed here: the test's own stdout stays)
    and the status is 141, with nothing said unless the command has a line for it (train says why it stopped)."""
    import genesis.errors as errors

    gone = []
    monkeypatch.setattr(errors, "reader_gone", lambda: gone.append(True) or errors.BROKEN_PIPE_EXIT)

    def body():
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    said = []
    assert run_cli(body, said.append) == 141 and said == [] and gone == [True]
    assert run_cli(body, said.append, broken_pipe="error: stdout closed") == 141 and said == ["error: stdout closed"]


def test_every_command_line_error_names_the_bad_input_in_one_line(tmp_path, capsys):
    """A missing checkpoint, through each command's main: one line, status 2, no traceback."""
    from genesis import export, sample
    from genesis.evaluate import cli as evaluate_cli

    missing = str(tmp_path / "nowhere")
    for main, argv in ((evaluate_cli.main, ["--checkpoint", missing, "--quiet"]),
                       (sample.main, ["--checkpoint", missing, "--prompt", "And"]),
                       (export.main, ["--checkpoint", missing, "--out", str(tmp_path / "out")])):
        assert main(argv) == ERROR_EXIT
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "nowhere" in err[0], (main, err)

