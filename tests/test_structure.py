"""The package's map, read from its source: folders by job in one order (no cycle between modules or between
folders), no private name used across modules, each folder stating its job and its modules, the command-line
modules train and finetune imported by no other module, and each top-level name defined in one module only."""

import ast
from collections import Counter
from pathlib import Path

import dtplib

PACKAGE = Path(dtplib.__file__).parent


def dotted(path: Path) -> str:
    """dtplib/tower/model.py -> "tower.model"; dtplib/tower/__init__.py -> "tower"; dtplib/train.py -> "train"."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


MODULES = {dotted(path): ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}
FOLDERS = sorted(path.parent.name for path in PACKAGE.glob("*/__init__.py"))
LEAVES = ("train", "finetune")  # command lines and notebook entry points: nothing in the package imports them
SHARED_NAMES = {"main"}  # every command-line module has its own `main`
# the folders from the bottom up: a folder imports only folders before it; the top-level modules (command lines)
# import any folder
LAYERS = ("common", "tower", "data", "training", "measure", "figures", "grid")


def package_of(module: str) -> list[str]:
    """The package a module's relative imports start from: "tower.model" -> ["tower"], "tower" -> ["tower"]."""
    is_package = (PACKAGE / module.replace(".", "/") / "__init__.py").exists()
    parts = module.split(".") if module != "__init__" else []
    return parts if is_package else parts[:-1]


def resolve(module: str, node: ast.ImportFrom) -> str | None:
    """The dotted dtplib module an ImportFrom names ("" for dtplib itself), or None outside dtplib."""
    if node.level:
        base = package_of(module)[:len(package_of(module)) - node.level + 1]
        return ".".join([*base, *(node.module.split(".") if node.module else [])])
    if node.module == "dtplib" or (node.module or "").startswith("dtplib."):
        return node.module[len("dtplib."):] if node.module != "dtplib" else ""
    return None


def package_imports(module: str, tree: ast.Module) -> dict[str, set[str]]:
    """{module of dtplib imported anywhere in the file (functions included): names taken from it}."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (target := resolve(module, node)) is not None:
            for alias in node.names:
                submodule = f"{target}.{alias.name}".lstrip(".")
                if submodule in MODULES:  # from dtplib.tower import model
                    found.setdefault(submodule, set())
                else:
                    found.setdefault(target or "__init__", set()).add(alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dtplib."):
                    found.setdefault(alias.name[len("dtplib."):], set())
    return {target: names for target, names in found.items() if target in MODULES and target != module}


def module_aliases(module: str, tree: ast.Module) -> dict[str, str]:
    """{local name: dtplib module} for `from dtplib.tower import model as m` and `from . import x`."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (target := resolve(module, node)) is not None:
            for alias in node.names:
                if f"{target}.{alias.name}".lstrip(".") in MODULES:
                    aliases[alias.asname or alias.name] = f"{target}.{alias.name}".lstrip(".")
    return aliases


GRAPH = {name: set(package_imports(name, tree)) for name, tree in MODULES.items()}


def unit(module: str) -> str:
    """A module's folder, or the module itself at the top level."""
    return module.split(".")[0]


def test_no_import_cycle():
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            if target == "__init__" or target in FOLDERS:  # the package's and folders' own re-exports
                continue
            assert state.get(target) != "open", f"import cycle: {' -> '.join([*path, module, target])}"
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state and module not in ("__init__", *FOLDERS):
            visit(module, [])


def test_folders_import_only_the_folders_below_them():
    assert sorted(LAYERS) == FOLDERS, "a new folder needs its place in LAYERS"
    upward = []
    for module, targets in GRAPH.items():
        if unit(module) not in LAYERS:
            continue
        below = LAYERS[:LAYERS.index(unit(module)) + 1]
        upward += [f"{module} imports {target}" for target in sorted(targets)
                   if target != "__init__" and unit(target) not in below]
    assert not upward, upward


def test_each_folder_states_its_job_and_modules():
    for folder in FOLDERS:
        tree = MODULES[folder]
        assert ast.get_docstring(tree), f"dtplib/{folder}/__init__.py has no docstring"
        exported = next(ast.literal_eval(node.value) for node in tree.body
                        if isinstance(node, ast.Assign) and node.targets[0].id == "__all__")
        modules = sorted(m.split(".")[1] for m in MODULES if m.startswith(folder + ".") and m.count(".") == 1
                         and not m.endswith("__main__"))
        assert sorted(exported) == modules, folder
        for module in modules:
            assert f"`{module}`" in ast.get_docstring(tree), f"dtplib/{folder}/__init__.py does not name {module}"


def test_no_private_name_across_modules():
    offenders = []
    for name, tree in MODULES.items():
        for module, names in package_imports(name, tree).items():
            offenders += [f"{name} imports {module}.{n}" for n in names if n.startswith("_") and n != "__version__"]
        aliases = module_aliases(name, tree)
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


def test_a_command_line_runs_its_main_once():
    """One `if __name__ == "__main__":` block per module: a second one ran the command a second time."""
    def is_main_guard(node) -> bool:
        return isinstance(node, ast.If) and ast.unparse(node.test) in ("__name__ == '__main__'",
                                                                       "'__main__' == __name__")
    guards = {name: sum(map(is_main_guard, tree.body)) for name, tree in MODULES.items()}
    assert {name: count for name, count in guards.items() if count > 1} == {}
    assert guards["bench"] == guards["flops"] == guards["viz"] == 1


def test_the_checks_see_the_package():
    """The graph is not empty by accident: train imports the training folder's modules, the tower's model imports
    packed, and a folder reaching up would be seen (the check runs on a made-up import)."""
    assert {"training.checkpoint", "training.config", "training.optim"} <= GRAPH["train"]
    assert "tower.packed" in GRAPH["tower.model"]
    made_up = ast.parse("from ..measure import stats")
    assert set(package_imports("tower.model", made_up)) == {"measure.stats"}
