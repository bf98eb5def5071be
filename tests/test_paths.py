"""Outputs go where the user is: relative paths resolve against the working checkout (found from the current
directory), never against the installed package, so two clones sharing one environment each write into their own."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dtplib.common import paths
from dtplib.common.paths import SOURCE_ROOT, data_path, data_root, find_checkout, repo_path, work_root


@pytest.fixture
def second_clone(tmp_path: Path) -> Path:
    """Another checkout of this project: what marks one is its pyproject.toml (and the notebooks/ beside it)."""
    clone = tmp_path / "clone"
    (clone / "notebooks").mkdir(parents=True)
    shutil.copy(SOURCE_ROOT / "pyproject.toml", clone / "pyproject.toml")
    return clone


def test_paths_follow_the_working_checkout(second_clone: Path, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("DTPLIB_DATA", raising=False)
    for cwd in (second_clone, second_clone / "notebooks"):  # a command line from the root, a notebook from notebooks/
        monkeypatch.chdir(cwd)
        assert find_checkout(cwd) == work_root() == second_clone != SOURCE_ROOT
        assert repo_path("results/demo") == second_clone / "results" / "demo"
        assert data_path("data/sample") == second_clone / "data" / "sample"
        assert data_root() == tmp_path / "shared" / "data"  # ../shared/data beside the working checkout
        assert repo_path("/abs/out") == Path("/abs/out")
        message = paths.other_checkout_message()
        assert f"imported from {SOURCE_ROOT}" in message and f"checkout is {second_clone}" in message
    elsewhere = tmp_path / "elsewhere"  # outside any checkout: the current directory
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert find_checkout(elsewhere) is None and repo_path("out") == elsewhere / "out"
    assert paths.other_checkout_message() is None
    (elsewhere / "pyproject.toml").write_text('[project]\nname = "another-project"\n')  # not ours: still no checkout
    assert work_root() == elsewhere and find_checkout(elsewhere) is None
    monkeypatch.chdir(SOURCE_ROOT)
    assert work_root() == SOURCE_ROOT and paths.other_checkout_message() is None


def test_children_run_this_process_code(second_clone: Path, monkeypatch):
    """A child started from the other clone's root would import that clone's dtplib through `-m`'s cwd entry."""
    monkeypatch.setenv("PYTHONPATH", "/some/where")
    env = paths.child_environment()
    assert env["PYTHONPATH"].split(os.pathsep) == [str(SOURCE_ROOT), "/some/where"] and env["PYTHONSAFEPATH"] == "1"


@pytest.mark.slow
def test_a_notebook_in_a_second_clone_writes_into_that_clone(second_clone: Path):
    """One environment, two clones: the code comes from this checkout (PYTHONPATH, as an editable install would),
    the cell runs in the second clone's notebooks/ folder, as a notebook does, and writes with a relative out_dir."""
    name = f"variants-{second_clone.parent.name}.csv"  # unique: not in this checkout whatever ran before
    code = ("import dtplib\n"
            "from dtplib.common.files import atomic_write_text\n"
            "from dtplib.common.paths import repo_path\n"
            "from dtplib.training.config import TrainConfig\n"
            "out = repo_path('results/demo/02_model')\n"
            "out.mkdir(parents=True)\n"
            f"atomic_write_text(out / '{name}', 'name\\n')\n"
            "print(dtplib.__file__)\n"
            "print(repo_path(TrainConfig().logs))\n")
    env = {**os.environ, "PYTHONPATH": str(SOURCE_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=second_clone / "notebooks", env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    imported, logs = result.stdout.split("\n")[:2]
    assert imported == str(SOURCE_ROOT / "dtplib" / "__init__.py")
    assert (second_clone / "results" / "demo" / "02_model" / name).read_text() == "name\n"
    assert not (SOURCE_ROOT / "results" / "demo" / "02_model" / name).exists()
    assert logs == str(second_clone / "logs")  # the default --logs too
    warnings = [line for line in result.stderr.splitlines() if "UserWarning" in line]
    assert len(warnings) == 1 and f"imported from {SOURCE_ROOT}" in warnings[0] and str(second_clone) in warnings[0]
