"""environment.yml, pyproject.toml and constraints.txt describe the same environment; the wheel installs and works."""

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from dtplib.common.paths import REPO_ROOT


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {canonicalize_name(r.name): r for r in map(Requirement, listed) if r.name != project["name"]}


def conda_pip_requirements() -> dict[str, Requirement]:
    environment = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "-e ." in pip_section, "the conda environment must install the package itself"
    assert "-c constraints.txt" in pip_section, "the conda environment installs the tested versions"
    listed = [line for line in pip_section if not line.startswith("-")]
    return {canonicalize_name(r.name): r for r in map(Requirement, listed)}


def test_environment_yml_and_pyproject_list_the_same_packages():
    assert set(conda_pip_requirements()) == set(pyproject_requirements())


def test_environment_yml_versions_satisfy_pyproject():
    """Equal specifiers, or an exact conda pin that pyproject's range admits (torch: pinned to what CI serves)."""
    project = pyproject_requirements()
    for name, conda in conda_pip_requirements().items():
        wanted = project[name].specifier
        if conda.specifier == wanted:
            continue
        pins = [s.version for s in conda.specifier if s.operator == "=="]
        assert pins and all(wanted.contains(v) for v in pins), f"{name}: environment.yml {conda.specifier} vs " \
                                                               f"pyproject {wanted}"


def test_constraints_pin_every_dependency_within_pyproject():
    """constraints.txt (what make installs) holds one exact version of every dependency, and pyproject admits it."""
    lines = (REPO_ROOT / "constraints.txt").read_text().splitlines()
    pins = {canonicalize_name(r.name): r for r in map(Requirement, [line for line in lines if line and line[0] != "#"])}
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in pins.values())
    for name, wanted in pyproject_requirements().items():
        assert name in pins, f"constraints.txt does not pin {name}: rerun scripts/constraints.py"
        version = next(iter(pins[name].specifier)).version
        assert wanted.specifier.contains(version), f"{name}: constraints.txt {version} vs pyproject {wanted.specifier}"
    assert "dataclasses" not in pins  # the backport the Makefile removes


# In the fresh environment: dtplib from the wheel, registered in open_clip, nothing read from a checkout, and the
# extras' modules hidden (None in sys.modules): dtplib imports, and a function that needs one names it.
WHEEL_CHECK = """
import sys
for name in ("fvcore", "papermill", "img2dataset", "pyarrow", "nbformat", "ipykernel", "jupyterlab"):
    sys.modules[name] = None
import dtplib, open_clip
from dtplib.common import paths, provenance
from dtplib.common.extras import MissingExtra
from dtplib import demo
from dtplib.data import download
from dtplib.measure import flops, tables
assert "DTP-ViT-Ti-8-64-4x" in open_clip.list_models()
print(dtplib.__file__)
print(paths.SOURCE_ROOT, paths.work_root(), provenance.git_commit())
try:
    flops.fvcore_macs(None, ())
except MissingExtra as error:
    print(error)
"""


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_environment(tmp_path: Path):
    """Build the wheel from a copy of the sources, install it without dependencies or network into a new virtual
    environment that sees this environment's packages (a .pth file: the researcher's own environment), and use it
    from a folder outside any checkout."""
    source = tmp_path / "source"  # a copy: building in place would leave build/ and *.egg-info in the checkout
    shutil.copytree(REPO_ROOT / "dtplib", source / "dtplib", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    run = lambda *command, **kw: subprocess.run(command, check=True, capture_output=True, text=True, timeout=300, **kw)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
        str(tmp_path / "dist"), str(source))
    wheel, = (tmp_path / "dist").glob("dtp_vit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {Path(name).parts[0] for name in archive.namelist()}
    assert tops == {"dtplib", "dtp_vit-0.1.0.dist-info"}, tops  # the package alone: no tests, notebooks or data
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    site = Path(run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "shared-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel))
    outside = tmp_path / "outside"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH", "DTPLIB_COMMIT")}
    lines = run(str(python), "-c", WHEEL_CHECK, cwd=outside, env=env).stdout.splitlines()
    assert lines[0] == str(site / "dtplib" / "__init__.py")  # the wheel's copy, not a checkout's
    assert lines[1] == f"None {outside} dtp-vit==0.1.0"  # outputs in the cwd; provenance: the installed version
    assert lines[2] == "fvcore is not installed: it comes with the `flops` extra, pip install 'dtp-vit[flops]'"
