"""environment.yml and pyproject.toml describe the same environment."""

import tomllib

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from dtplib.common.paths import REPO_ROOT


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {canonicalize_name(r.name): r for r in map(Requirement, listed)}


def conda_pip_requirements() -> dict[str, Requirement]:
    environment = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "-e ." in pip_section, "the conda environment must install the package itself"
    listed = [line for line in pip_section if not line.startswith("-e")]
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
