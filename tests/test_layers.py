"""The library's layers, enforced: every import, function-level ones included.

The order is written down in ``ARCHITECTURE.md`` ("Layers"); this test is its guard. A
package may import only from its own layer and the layers below it, and no two modules
import each other, however indirectly: no cycle, lazy imports included. Code moves to
where the order allows it; the order is never bent to fit the code.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. "base" is the top-level modules of clipbatch (errors, records, window, ...);
# ``faults`` is a layer of its own, above the upgrade paths (old crash-point names).
LAYERS = (
    "base",
    "config",
    "upgrade",
    "faults",
    "io",
    "sources",
    "preprocess",
    "models",
    "encode",
    "sink",
    "tables",
    "plan",
    "pipeline",
    "lineage",
    "knn",
    "heads",
    "judge",
    "curate",
    "query",
    "serve",
    "training",
    "cli",
)
# Installed package -> its folder in the repository. The Prefect layers sit above the
# library: tasks below flows, and nothing in clipbatch imports either (or prefect).
PACKAGES = {"clipbatch": "clipbatch", "clipbatch_tasks": "tasks", "clipbatch_flows": "flows"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imported_names(path: Path, module: str) -> Iterator[tuple[str, int]]:
    """Every module name an import statement anywhere in the file names (and its line)."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:  # `from clipbatch.sink import rows` imports a module
                yield f"{target}.{alias.name}", node.lineno


def edges() -> dict[str, set[tuple[str, int]]]:
    """module -> the project modules it imports (names resolved to modules that exist)."""
    known = modules()
    out: dict[str, set[tuple[str, int]]] = {m: set() for m in known}
    for module, path in known.items():
        for name, line in imported_names(path, module):
            # `from clipbatch.records import OK` names the module clipbatch.records.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                out[module].add((name, line))
    return out


def layer_of(module: str) -> tuple[int, str]:
    package, _, rest = module.partition(".")
    if package == "clipbatch_tasks":
        return len(LAYERS), "clipbatch_tasks"
    if package == "clipbatch_flows":
        return len(LAYERS) + 1, "clipbatch_flows"
    top = rest.split(".")[0] if rest else ""
    layer = top if top in LAYERS else "base"
    if top and (ROOT / "clipbatch" / top).is_dir():
        assert top in LAYERS, f"clipbatch/{top}/ is a package with no place in LAYERS"
    return LAYERS.index(layer), layer


def test_every_import_points_down_the_layers() -> None:
    wrong = []
    for module, targets in edges().items():
        rank, layer = layer_of(module)
        for target, line in targets:
            target_rank, target_layer = layer_of(target)
            if target_rank > rank:
                wrong.append(f"{module}:{line} ({layer}) imports {target} ({target_layer})")
    assert not wrong, "imports that go up the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle_between_modules() -> None:
    graph = {m: {t for t, _ in ts} for m, ts in edges().items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join([*stack[stack.index(t) :], t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("module", sorted(m for m in modules() if m.startswith("clipbatch.")))
def test_the_library_never_imports_prefect_or_its_flows(module: str) -> None:
    path = modules()[module]
    for name, line in imported_names(path, module):
        top = name.split(".")[0]
        assert top not in {"prefect", "clipbatch_flows", "clipbatch_tasks", "flows", "tasks"}, (
            f"{module}:{line} imports {name}: the library is plain Python"
        )
