"""The package's shape, checked: no import cycle, no function over a screenful and a half, one engine
path with no "distributed or not" branch, library code free of argparse."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "dpokit"
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, ast.Module]:
    return {_module_name(path): ast.parse(path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """module -> the dpokit modules it imports anywhere in its body (function-level imports included).

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``. Importing a
    submodule implicitly runs its parent package's ``__init__``, but that is Python's doing, not an
    edge written in the code, so it is not counted.
    """
    sources = _sources()
    graph: dict[str, set[str]] = {name: set() for name in sources}
    for name, tree in sources.items():
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [
                    f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in sources else node.module
                    for alias in node.names
                ]
            graph[name].update(t for t in targets if t in sources and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_is_longer_than_a_screenful_and_a_half():
    long = []
    for name, tree in _sources().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, long


ENGINE_MODULES = ("dpokit.training.trainer", "dpokit.training.step")
WORLD_NAMES = {"world_size", "strategy", "backend", "dist_ctx", "is_initialized", "distributed"}


@pytest.mark.parametrize("module", ENGINE_MODULES)
def test_the_training_loop_and_step_never_branch_on_the_number_of_processes(module):
    """One process is a world of one: the loop and the step read the same on 1 and on N ranks.
    Only the parallel context and the wrapping know how many there are (rank 0 may still be the one
    that writes files: ``ctx.is_main`` is allowed)."""
    tree = _sources()[module]
    offending = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp, ast.While)):
            names = {n.attr for n in ast.walk(node.test) if isinstance(n, ast.Attribute)}
            names |= {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}
            if names & WORLD_NAMES:
                offending.append(f"line {node.lineno}: {ast.unparse(node.test)}")
    assert not offending, offending


def test_library_modules_take_no_argparse_namespace():
    """Commands translate arguments into typed configs; nothing outside ``dpokit.commands`` sees argparse."""
    users = [
        name
        for name, tree in _sources().items()
        if not name.startswith("dpokit.commands")
        and any(isinstance(n, (ast.Import, ast.ImportFrom)) and "argparse" in ast.unparse(n) for n in ast.walk(tree))
    ]
    assert not users, users


# The layers, bottom to top: a module may import from its own layer and the layers below it, never from
# a layer above. Each entry names top-level parts of the package (a sub-package counts with its modules).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "locations", "rundir", "compat", "config", "losses"),
    ("data", "models"),
    ("logprobs", "generation"),
    ("training", "judges", "scoring"),
    ("online", "analysis", "serve"),
    ("experiments",),
    ("commands", "__main__"),
)


def layer_of(module: str) -> int | None:
    """The index in :data:`LAYERS` of a dpokit module (``dpokit.judges.reward`` -> the layer of ``judges``);
    None for the package itself (``dpokit``: its ``__init__`` holds only the version)."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS; add its top-level name to the table")


def _imports(tree: ast.Module, sources: dict[str, ast.Module]) -> list[tuple[int, str, list[str]]]:
    """Every dpokit import in a module's body, function-level ones included, as (line, module, names)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names if alias.name.startswith("dpokit")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("dpokit"):
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def upward_imports(sources: dict[str, ast.Module]) -> list[str]:
    """``module:line imports target (layer a < layer b)`` for every import from a lower layer to a higher one."""
    offenders = []
    for name, tree in sources.items():
        own = layer_of(name)
        for line, target, names in _imports(tree, sources):
            targets = [f"{target}.{n}" if f"{target}.{n}" in sources else target for n in names] or [target]
            for imported in dict.fromkeys(targets):
                theirs = layer_of(imported)
                if own is not None and theirs is not None and theirs > own:
                    offenders.append(f"{name}:{line} imports {imported} (layer {own} {LAYERS[own]} < {theirs} {LAYERS[theirs]})")
    return offenders


def private_imports(sources: dict[str, ast.Module]) -> list[str]:
    """``module:line imports target._name`` for every ``from target import _name`` of another module's
    private name (dunders such as ``__version__`` are public)."""
    offenders = []
    for name, tree in sources.items():
        for line, target, names in _imports(tree, sources):
            for imported in names:
                private = imported.startswith("_") and not (imported.startswith("__") and imported.endswith("__"))
                if private and target != name:
                    offenders.append(f"{name}:{line} imports {target}.{imported}")
    return offenders


def test_layers_only_import_downwards():
    """commands -> experiments -> online/analysis/serve -> training/judges/scoring -> logprobs/generation ->
    data/models -> errors/locations/compat/config/losses: an import that points up, even inside a function,
    is named with its line."""
    offenders = upward_imports(_sources())
    assert not offenders, "\n".join(offenders)


def test_no_module_imports_another_modules_private_name():
    offenders = private_imports(_sources())
    assert not offenders, "\n".join(offenders)


def test_the_layer_check_names_an_import_inside_a_function_that_points_up():
    """The judges once imported the analysis layer from inside a function; the check names such an import."""
    sources = {
        "dpokit.judges.reward": ast.parse("def load():\n    from dpokit.analysis.score import score_rows\n"),
        "dpokit.analysis.score": ast.parse("from dpokit.judges.base import Judge\n"),
        "dpokit.judges.base": ast.parse(""),
    }
    assert upward_imports(sources) == [
        "dpokit.judges.reward:2 imports dpokit.analysis.score (layer 3 ('training', 'judges', 'scoring') "
        "< 4 ('online', 'analysis', 'serve'))"
    ]


def test_the_private_name_check_names_the_import_and_lets_dunders_through():
    sources = {
        "dpokit.commands.serve": ast.parse("def f():\n    from dpokit.commands.frontier import _parse_run\n"),
        "dpokit.commands.main": ast.parse("from dpokit import __version__\n"),
        "dpokit.commands.frontier": ast.parse(""),
    }
    assert private_imports(sources) == ["dpokit.commands.serve:2 imports dpokit.commands.frontier._parse_run"]
