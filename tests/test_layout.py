"""The package's shape: no import cycles between its modules, and the terminal libraries only in its CLI layer."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "numclip_cli"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every numclip_cli module → the numclip_cli modules it imports anywhere (top level, functions, TYPE_CHECKING)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("numclip_cli"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("numclip_cli"))
        graph[name] = {dep for dep in deps if dep in modules and dep != name}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (cycle := visit(dep, [*path, dep])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_no_import_cycles_between_package_modules() -> None:
    graph = _imports()
    assert "numclip_cli.predictor" in graph["numclip_cli.evaluation"]  # the walk sees imports at all
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def _third_party_imports(path: Path) -> set[str]:
    """Top-level names of the packages a module imports anywhere in it."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
    return names


def test_only_the_command_line_layer_imports_the_terminal_libraries() -> None:
    """rich and typer are presentation: the core (model, data, writers, bench) stays usable without a terminal."""
    layer = {path.relative_to(PACKAGE).as_posix(): _third_party_imports(path) for path in PACKAGE.rglob("*.py")}
    assert "rich" in layer["cli/table.py"]  # the scan sees them at all
    offenders = {name: sorted(deps & {"rich", "typer"}) for name, deps in layer.items()
                 if not name.startswith("cli/") and deps & {"rich", "typer"}}
    assert not offenders, offenders


def test_cycle_finder_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]



def test_version_has_one_source() -> None:
    """pyproject takes the version from ``numclip_cli.__version__``, so the two can never disagree."""
    import tomllib

    import numclip_cli

    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "numclip_cli.__version__"}
    assert numclip_cli.__version__.count(".") == 2


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_a_declared_dependency_with_bounds() -> None:
    """Each third-party import of the package is declared (with ``>=`` for `make test-lowest` and ``<`` the next
    major for runtime dependencies); optional extras count for the modules that import them lazily."""
    import sys
    import tomllib
    from importlib.metadata import packages_distributions

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = {_normalised(re.split(r"[<>=\[ ]", r)[0]): r for r in project["dependencies"]}
    extras = {_normalised(re.split(r"[<>=\[ ]", r)[0])
              for name, requirements in project["optional-dependencies"].items() if name != "test"
              for r in requirements}
    for requirement in runtime.values():
        assert ">=" in requirement and "<" in requirement.replace("<=", ""), requirement
    imported: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"numclip_cli"}
    distributions = packages_distributions()
    undeclared = {name for name in third_party
                  if not {_normalised(d) for d in distributions.get(name, [name])} & (runtime.keys() | extras)}
    assert "huggingface_hub" in third_party and undeclared == set()
