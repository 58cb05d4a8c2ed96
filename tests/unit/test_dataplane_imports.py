"""The dataplane package has no import cycle (imports inside functions count too): a
cycle makes import order matter and forces lazy imports that hide the dependency."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "meshd" / "dataplane"


def _imports(path: Path) -> set[str]:
    """Sibling modules of meshd.dataplane that `path` imports, anywhere in the file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "meshd.dataplane":
                out |= {a.name for a in node.names}
            elif node.module.startswith("meshd.dataplane."):
                out.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("meshd.dataplane."):
                    out.add(a.name.split(".")[2])
    return out


def test_no_import_cycle_in_the_dataplane_package():
    mods = {p.stem: _imports(p) & {q.stem for q in PKG.glob("*.py")}
            for p in PKG.glob("*.py") if p.stem != "__init__"}
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for dep in sorted(mods.get(m, ())):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(stack + [m, dep])}"
            if dep not in state:
                visit(dep, stack + [m])
        state[m] = 2
    for m in sorted(mods):
        if m not in state:
            visit(m, [])
    assert "pins" in mods["tc"] and "loader" not in mods["tc"]
