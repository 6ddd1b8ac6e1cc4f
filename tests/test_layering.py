"""The stage packages import one another without cycles.

Each stage folder is one layer of ``cytoedge.*``; runtime/commands/ (the CLI) is its own top layer that
no stage imports. Every import counts, including the lazy ones inside functions: a cycle through a lazy
import is still a cycle in the design, and the next eager import makes it a real one.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the stage folders, each named as its layer (but runtime/commands/, the layer "commands")
STAGES = ("runtime", "export", "calibration", "training", "kernels", "models")


def layer_of_module(module: str) -> str | None:
    """The layer of an absolute module name, or None outside cytoedge's stages."""
    parts = module.split(".")
    if parts[0] != "cytoedge" or len(parts) < 2 or parts[1] not in STAGES:
        return None
    if parts[1] == "runtime" and len(parts) > 2 and parts[2] == "commands":
        return "commands"
    return parts[1]


def layer_of_file(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    return "commands" if rel[:2] == ("runtime", "commands") else rel[0]


def module_of_file(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("").parts
    if rel[-1] == "__init__":
        rel = rel[:-1]
    return ".".join(("cytoedge",) + rel)


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    module = module_of_file(path, root).split(".")
    package = module if path.name == "__init__.py" else module[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)  # `from cytoedge.x import module`
    return out


def dependency_graph() -> dict[tuple[str, str], set[str]]:
    """(importing layer, imported layer) → the files (relative to the repository) that make the edge."""
    edges: dict[tuple[str, str], set[str]] = defaultdict(set)
    for folder in STAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            src = layer_of_file(path)
            for module in imported_modules(path):
                dst = layer_of_module(module)
                if dst is not None and dst != src:
                    edges[(src, dst)].add(str(path.relative_to(ROOT)))
    return dict(edges)


def find_cycle(edges) -> list[str] | None:
    """One cycle of the directed graph given by ``edges`` (pairs), as [a, b, ..., a], or None."""
    succ = defaultdict(set)
    for a, b in edges:
        succ[a].add(b)
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(succ[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(succ):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_on_hand_made_graphs():
    assert find_cycle([("a", "b"), ("b", "c"), ("a", "c")]) is None
    assert find_cycle([]) is None
    cycle = find_cycle([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")])
    assert cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert find_cycle([("x", "y"), ("y", "x")]) in (["x", "y", "x"], ["y", "x", "y"])


def test_import_scanner_sees_lazy_and_relative_imports(tmp_path):
    src = tmp_path / "runtime" / "backends" / "m.py"
    src.parent.mkdir(parents=True)
    src.write_text("def f():\n    from cytoedge.calibration.decisions import decide\n"
                   "    import cytoedge.export.fp16\nfrom .. import bundle\nfrom .checks import check_batch\n")
    found = imported_modules(src, tmp_path)
    assert {"cytoedge.calibration.decisions", "cytoedge.export.fp16", "cytoedge.runtime.bundle",
            "cytoedge.runtime.backends.checks"} <= found
    assert {layer_of_module(m) for m in found} - {None} == {"calibration", "export", "runtime"}
    assert layer_of_module("cytoedge.calibration.decisions") == "calibration"
    assert layer_of_module("cytoedge.runtime.commands.classify") == "commands"
    assert layer_of_module("numpy") is None


def test_stage_packages_have_no_import_cycle():
    edges = dependency_graph()
    cycle = find_cycle(edges)
    if cycle:
        detail = "\n".join(f"  {a} -> {b}: {', '.join(sorted(edges[(a, b)]))}" for a, b in zip(cycle, cycle[1:]))
        raise AssertionError(f"import cycle {' -> '.join(cycle)}:\n{detail}")


def test_nothing_imports_the_cli_layer():
    edges = dependency_graph()
    into_cli = {k: v for k, v in edges.items() if k[1] == "commands"}
    assert not into_cli, into_cli
