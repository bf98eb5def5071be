"""The package's map, read from its source: no import cycle, no private name used across modules, the command-line
modules train and finetune imported by no other module, and each top-level name defined in one module only."""

import ast
from collections import Counter
from pathlib import Path

import dtplib

PACKAGE = Path(dtplib.__file__).parent
MODULES = {path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.glob("*.py"))}
LEAVES = ("train", "finetune")  # command lines and notebook entry points: nothing in the package imports them
SHARED_NAMES = {"main"}  # every command-line module has its own `main`


def package_imports(tree: ast.Module) -> dict[str, set[str]]:
    """{module of dtplib imported anywhere in the file (functions included): names taken from it}."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import a
                found.setdefault(node.module.split(".")[0], set()).update(a.name for a in node.names)
            elif node.level == 1 or node.module == "dtplib":  # from . import x / from dtplib import x
                for alias in node.names:
                    found.setdefault(alias.name, set())
            elif node.module and node.module.startswith("dtplib."):
                found.setdefault(node.module.split(".")[1], set()).update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dtplib."):
                    found.setdefault(alias.name.split(".")[1], set())
    return {module: names for module, names in found.items() if module in MODULES}


def module_aliases(tree: ast.Module) -> dict[str, str]:
    """{local name: dtplib module} for `from dtplib import x as y` and `from . import x`."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module == "dtplib" or (node.level == 1 and not node.module)):
            for alias in node.names:
                aliases[alias.asname or alias.name] = alias.name
    return aliases


GRAPH = {name: set(package_imports(tree)) - {name} for name, tree in MODULES.items() if name != "__init__"}


def test_no_import_cycle():
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            assert state.get(target) != "open", f"import cycle: {' -> '.join([*path, module, target])}"
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])


def test_no_private_name_across_modules():
    offenders = []
    for name, tree in MODULES.items():
        for module, names in package_imports(tree).items():
            offenders += [f"{name} imports {module}.{n}" for n in names if n.startswith("_") and n != "__version__"]
        aliases = module_aliases(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_")):
                offenders.append(f"{name} uses {aliases[node.value.id]}.{node.attr}")
    assert not offenders, offenders


def test_command_line_modules_are_leaves():
    importers = {leaf: sorted(m for m, targets in GRAPH.items() if leaf in targets) for leaf in LEAVES}
    assert importers == {leaf: [] for leaf in LEAVES}


def test_each_top_level_name_is_defined_once():
    defined = Counter(node.name for tree in MODULES.values() for node in tree.body
                      if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"))
    repeated = sorted(name for name, count in defined.items() if count > 1 and name not in SHARED_NAMES)
    assert not repeated, f"defined in more than one module: {repeated}"


def test_the_checks_see_the_package():
    """The graph is not empty by accident: train imports clip, config and optim."""
    assert {"clip", "config", "optim"} <= GRAPH["train"]
