"""The import graph of lorasweep's packages, read from the source (every import, also those inside functions).

    python tests/import_graph.py          # one line per module: what it imports of sweeps, trainables and eval

tests/test_import_graph.py checks it: no cycles, and the layers point one way (sweeps -> eval -> trainables).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sweeps", "trainables", "eval")
# A package may import the packages to its right, never those to its left.
LAYERS = ("sweeps", "eval", "trainables")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the three packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from eval import report` names a module; `from eval.report import write_report` a function.
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            else:
                continue
            imported |= {target for target in targets if target in modules and target != name}
        graph[name] = imported
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle found by a depth-first search (each one once, from where the search met it)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that point against LAYERS (e.g. eval importing sweeps)."""
    rank = {package: index for index, package in enumerate(LAYERS)}
    return [f"{source} -> {target}" for source, targets in sorted(graph.items()) for target in sorted(targets)
            if rank[target.split(".")[0]] < rank[source.split(".")[0]]]


def main() -> int:
    graph = import_graph()
    for name in sorted(graph):
        print(f"{name} -> {', '.join(sorted(graph[name])) or '(nothing of the project)'}")
    problems = [f"cycle: {' -> '.join(c)}" for c in cycles(graph)] + [f"against the layers: {v}"
                                                                       for v in layer_violations(graph)]
    print("\n".join(problems) if problems else f"\nno cycles; the layers point one way: {' -> '.join(LAYERS)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
