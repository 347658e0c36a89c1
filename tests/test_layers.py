"""The layering the project promises, read from the source with Python's own parser:
``l2o/`` imports nothing from ``callbacks/``, no import cycles, no concrete optimizer types in
generic code, no global matplotlib state, no private torch API in the analyses."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

# Imports that point back up the layers (none today); listed here, each must still exist.
KNOWN_BACK_EDGES: set[tuple[str, str]] = set()


def modules() -> dict[str, Path]:
    out = {"evaluate": REPO / "evaluate.py", "train": REPO / "train.py"}
    for package in ("l2o", "callbacks"):
        for path in sorted((REPO / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    return out


def imports(path: Path) -> set[str]:
    """Every module imported anywhere in the file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {i for i in imports(p) if i in mods and i != m} for m, p in mods.items()}


def test_l2o_imports_nothing_from_callbacks():
    for module, deps in graph().items():
        if module.startswith("l2o"):
            assert not {d for d in deps if d.startswith("callbacks")}, module


def test_no_import_cycles():
    edges = graph()
    for a, b in KNOWN_BACK_EDGES:
        assert b in edges[a], f"{a} no longer imports {b}: empty KNOWN_BACK_EDGES"
        edges[a] = edges[a] - {b}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = [m for m in edges if m in reach(m)]
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_generic_code_never_checks_a_concrete_optimizer_type():
    # l2o/lstm.py may check its own class (LSTMOptimizer.replay falls back for subclasses).
    for module, path in modules().items():
        if module == "l2o.lstm":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Call):
                func = node.left.func
                assert not (isinstance(func, ast.Name) and func.id == "type"), (
                    f"{path.name}:{node.lineno}: type(...) comparison"
                )


def test_no_global_matplotlib_state_and_no_private_pytree():
    for module, path in modules().items():
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                call = ast.unparse(node.value.func)
                assert call != "matplotlib.use", f"{path.name}: module-level matplotlib.use"
        if module.startswith("callbacks") or module in (
            "evaluate",
            "l2o.lstm",
            "l2o.lstm_replay",
            "l2o.covariance",
            "l2o.evaluation",
            "l2o.meta_testing",
            "l2o.report",
            "l2o.records",
            "l2o.specs",
            "l2o.streams",
            "l2o.analysis",
            "l2o.optimizers",
            "l2o.symmetry",
        ):
            assert "_pytree" not in path.read_text(), path.name
