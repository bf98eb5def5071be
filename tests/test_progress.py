"""Progress bars: tqdm.auto bars that `--quiet`, DTPLIB_QUIET=1 and CI turn off, in this process and its children."""

import io
import os

import pytest

from dtplib.common.cli import run_cli
from dtplib.common.progress import QUIET_ENV, is_quiet, progress


class Terminal(io.StringIO):
    """A text stream that says it is a terminal, as a console's stderr does (tqdm draws only there)."""

    def isatty(self) -> bool:
        return True


def drawn(**options) -> str:
    stream = Terminal()
    assert list(progress(range(3), desc="zero-shot", file=stream, **options)) == [0, 1, 2]  # the items, always
    return stream.getvalue()


@pytest.fixture
def loud(monkeypatch):
    monkeypatch.delenv(QUIET_ENV, raising=False)
    monkeypatch.delenv("CI", raising=False)


@pytest.mark.parametrize("name, value, quiet", [(QUIET_ENV, "1", True), ("CI", "true", True), (QUIET_ENV, "0", False),
                                                ("CI", "false", False), ("CI", "", False)])
def test_quiet_by_environment(loud, monkeypatch, name, value, quiet):
    monkeypatch.setenv(name, value)
    assert is_quiet() is quiet
    assert ("zero-shot" in drawn()) is not quiet


def test_a_bar_is_drawn_on_a_terminal_and_not_elsewhere(loud):
    assert "zero-shot" in drawn() and "zero-shot" in drawn(leave=True)
    assert drawn(disable=True) == ""  # e.g. the other ranks of a DDP run
    stream = io.StringIO()  # a file or a pipe (nohup, Slurm): tqdm's own test, the log lines cover it
    list(progress(range(3), desc="zero-shot", file=stream))
    assert stream.getvalue() == ""


def test_quiet_flag_of_every_command_line(loud):
    """`--quiet` anywhere in a command line's argv: taken out, quiet for the command (and the processes it starts,
    through the environment), and the environment as it was afterwards."""
    seen = run_cli(lambda argv: (argv, is_quiet(), os.environ.get(QUIET_ENV), drawn()), ["--a", "--quiet", "1"])
    assert seen == (["--a", "1"], True, "1", "")
    assert QUIET_ENV not in os.environ and not is_quiet()
    assert run_cli(lambda argv: is_quiet(), ["--a"]) is False
