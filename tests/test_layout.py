"""The package's shape: modules import in one direction (data -> model -> train -> cli), with no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vlm_train"
# What each layer may import from the package (a layer always may import itself).
ALLOWED = {
    "runtime": set(),
    "jsonio": set(),
    "devices": set(),
    "data": {"runtime", "jsonio"},
    "model": {"data", "runtime", "jsonio", "devices"},
    "train": {"data", "model", "runtime", "jsonio", "devices"},
    "inference": {"data", "model", "train", "devices", "jsonio"},
    "cli": {"data", "model", "train", "inference", "devices", "jsonio", "runtime"},
    "benchmarking": {"data", "model"},  # the packed-vs-padded benchmarks' harness (tools/bench_*.py)
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the vlm_train modules it imports (at any depth of the file: lazy imports count too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets |= {base} | {f"{base}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in modules and t not in (name, "vlm_train")}
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "vlm_train"


def test_layers_import_in_one_direction():
    wrong = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if _layer(module) in ALLOWED
        and _layer(target) != _layer(module)
        and _layer(target) not in ALLOWED[_layer(module)]
    ]
    assert not wrong, wrong


def test_no_import_cycles():
    graph = import_graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(module) :] + [module]))
        if module in done:
            return
        for target in sorted(graph[module]):
            if not target.endswith("__init__") and target != module.rpartition(".")[0]:
                visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
