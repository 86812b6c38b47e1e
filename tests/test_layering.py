"""The package's arrows point one way: no two modules of sdcli import each other (directly or around a loop, lazy
imports counted), only the model families build networks, and the CLI uses nothing but the public API."""

from __future__ import annotations

import ast
from pathlib import Path

import sdcli

PACKAGE = Path(sdcli.__file__).resolve().parent
THIRD_PARTY_CLI_IMPORTS = {"click", "numpy", "rich"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The sdcli modules ``path`` imports, anywhere in it (a name imported from a package counts as its module
    when there is one), the package root itself left out."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != "sdcli":
                found.add(target)
    found.discard(name)
    return found


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def test_no_import_cycles():
    graph = {name: imported_modules(path) for name, path in MODULES.items()}
    cycles = []

    def visit(name: str, trail: list[str], done: set[str]) -> None:
        for target in sorted(graph.get(name, ())):
            if target in trail:
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in done:
                visit(target, trail + [target], done)
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name], done)
    assert not cycles, "\n".join(cycles)


def test_only_the_families_build_networks():
    """Outside sdcli.nn itself, only sdcli.families imports the networks (the tokenizer aside)."""
    offenders = []
    for name, path in MODULES.items():
        if name.startswith(("sdcli.nn", "sdcli.families")):
            continue
        for target in imported_modules(path):
            if target.startswith("sdcli.nn") and target != "sdcli.nn.tokenizer":
                offenders.append(f"{name} imports {target}")
    assert not offenders, offenders


def test_the_cli_uses_the_public_api_only():
    tree = ast.parse((PACKAGE / "cli.py").read_text(encoding="utf-8"))
    imports = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module.split(".")[0] != "sdcli", ast.unparse(node)
            imports.add(node.module)
    roots = {name.split(".")[0] for name in imports}
    import sys

    assert "sdcli" in imports and not {name for name in imports if name.startswith("sdcli.")}
    assert roots - {"sdcli"} <= THIRD_PARTY_CLI_IMPORTS | set(sys.stdlib_module_names), roots
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "sdcli"}
    assert used <= set(sdcli.__all__), sorted(used - set(sdcli.__all__))


def test_the_public_api_is_what_all_lists():
    for name in sdcli.__all__:
        assert hasattr(sdcli, name), name
    public = {name for name, value in vars(sdcli).items()
              if not name.startswith("_") and getattr(value, "__module__", None) is not None
              and not isinstance(value, type(sdcli))}
    assert public <= set(sdcli.__all__), sorted(public - set(sdcli.__all__))


# package -> the sdcli packages below which it must not reach: the networks never reach files or pipelines, the op
# backends never reach networks, files or samplers, the samplers never reach networks or backends
FORBIDDEN = {
    "sdcli.nn": ("sdcli.io", "sdcli.families", "sdcli.pipelines", "sdcli.models", "sdcli.hub", "sdcli.cli"),
    "sdcli.ops": ("sdcli.io", "sdcli.nn", "sdcli.families", "sdcli.pipelines", "sdcli.sampling", "sdcli.models"),
    "sdcli.sampling": ("sdcli.io", "sdcli.nn", "sdcli.ops", "sdcli.families", "sdcli.pipelines"),
    "sdcli.io": ("sdcli.nn", "sdcli.families", "sdcli.pipelines", "sdcli.cli"),
}


def test_layers_import_downwards():
    offenders = [f"{name} imports {target}" for name, path in MODULES.items() for layer, below in FORBIDDEN.items()
                 if name.startswith(layer + ".") or name == layer
                 for target in imported_modules(path) if target.startswith(below)]
    assert not offenders, offenders
