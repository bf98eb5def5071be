"""Write constraints.txt: the exact versions `make install` uses (`pip install -c constraints.txt -e '.[all,dev]'`).

Run it in a .venv that passes `make test`: `.venv/bin/python scripts/constraints.py > constraints.txt`. It walks
pyproject.toml's dependencies with every extra through the installed packages' own requirements (markers evaluated
for this machine, extras followed) and pins each package reached at its installed version, local labels dropped
(torch 2.14.1+cu130 -> 2.14.1). A package required but not installed is left out with a note: the `dataclasses`
backport, which the Makefile removes after installing.
"""

from __future__ import annotations

import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def wanted(requirement: Requirement, extras: set[str]) -> bool:
    """Whether a requirement applies here, for a package installed with `extras`."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in extras | {""})


def closure(project: dict) -> tuple[dict[str, str], list[str]]:
    """Installed versions of every package the project reaches, and the names required but not installed."""
    name = canonicalize_name(project["name"])
    queue = [Requirement(r) for r in project["dependencies"]]
    queue += [Requirement(r) for extra in project.get("optional-dependencies", {}).values() for r in extra]
    pinned: dict[str, str] = {}
    seen: set[tuple[str, frozenset]] = set()
    missing: list[str] = []
    while queue:
        requirement = queue.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen or key[0] == name:
            continue
        seen.add(key)
        try:
            dist = distribution(requirement.name)
        except PackageNotFoundError:
            missing.append(key[0])
            continue
        pinned[key[0]] = Version(dist.version).public
        queue += [r for r in map(Requirement, dist.requires or []) if wanted(r, set(requirement.extras))]
    return pinned, sorted(set(missing))


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned, missing = closure(project)
    lines = ["# The tested set: `make install` runs pip install -c constraints.txt -e '.[all,dev]'.",
             f"# Written by scripts/constraints.py on Python {sys.version.split()[0]} ({sys.platform}); do not edit.",
             *(f"# not pinned (required but not installed): {name}" for name in missing),
             *(f"{name}=={version}" for name, version in sorted(pinned.items()))]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
