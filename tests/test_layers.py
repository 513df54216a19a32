"""The package's imports point one way: down the layers of docs/ARCHITECTURE.md, with no cycle between folders.

Every import of every module is read with `ast` (inside functions too, relative imports resolved), so a lazy import
cannot hide an upward dependency. The layer order is parsed from the architecture document, so the document and
the code cannot drift apart."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lightclip_core"
MAX_LINES = 450


def layers(doc: Path = ROOT / "docs" / "ARCHITECTURE.md") -> list[list[str]]:
    """The LAYERS block of the architecture document, top layer first."""
    block = re.search(r"```\nLAYERS[^\n]*\n(.*?)```", doc.read_text(), flags=re.S)
    assert block, f"{doc}: no LAYERS block"
    return [line.split() for line in block.group(1).strip().splitlines()]


def unit_of(module: str) -> str | None:
    """The folder (or top-level module) of `lightclip_core.<unit>...`; None for the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import of `lightclip_core` in the file, relative ones resolved."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found += [(node.lineno, name)]
            found += [(node.lineno, f"{name}.{a.name}") for a in node.names if name == PACKAGE]  # from pkg import x
    return [(line, name) for line, name in found if name == PACKAGE or name.startswith(PACKAGE + ".")]


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file (a package by its own name, not `.__init__`)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def violations(root: Path, order: list[list[str]]) -> list[str]:
    """Upward imports, imports of unlisted units and cycles between units, as readable lines."""
    rank = {unit: i for i, row in enumerate(order) for unit in row}  # 0 = top
    problems: list[str] = []
    edges: dict[str, set[str]] = {}
    for module, path in modules(root).items():
        src = unit_of(module)
        if src is not None and src not in rank:
            problems.append(f"{module}: its folder {src!r} is in no layer of docs/ARCHITECTURE.md")
            continue
        for line, target in imports_of(path, module):
            dst = unit_of(target)
            if src is None and dst is not None:
                problems.append(f"{module}:{line} the package root imports {target}")
            if src is None or dst is None or dst == src:
                continue
            if dst not in rank:
                problems.append(f"{module}:{line} imports {target}, whose folder is in no layer")
            elif rank[dst] < rank[src]:
                problems.append(f"{module}:{line} imports {target}: {dst!r} is above {src!r}")
            else:
                edges.setdefault(src, set()).add(dst)
    problems += [f"import cycle between folders: {' -> '.join(c)}" for c in cycles(edges)]
    return problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of the folder graph (depth-first search)."""
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            found.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(edges.get(node, ())):
            visit(nxt, path + [node])
        done.add(node)

    for start in sorted(edges):
        visit(start, [])
    return found


def test_every_import_points_down_the_layers() -> None:
    assert violations(ROOT / PACKAGE, layers()) == []


def test_the_checker_sees_upward_imports_lazy_ones_and_cycles(tmp_path: Path) -> None:
    pkg = tmp_path / PACKAGE
    for folder in ("infra", "models", "data"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "infra" / "low.py").write_text("def f():\n    from lightclip_core.models import thing\n")  # lazy, upward
    (pkg / "data" / "a.py").write_text("from ..models import b\n")  # relative, downward: fine
    (pkg / "models" / "b.py").write_text("import lightclip_core.data.a\n")  # same layer, makes a cycle
    (pkg / "stray.py").write_text("")
    found = violations(pkg, [["data", "models"], ["infra"]])
    assert any("low:2 imports lightclip_core.models: 'models' is above 'infra'" in p for p in found), found
    assert any("cycle" in p and "data" in p and "models" in p for p in found), found
    assert any("'stray' is in no layer" in p for p in found), found
    assert not any("data.a" in p and "above" in p for p in found), found


def test_no_library_module_imports_kfp_or_dvc() -> None:
    for module, path in modules(ROOT / PACKAGE).items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not [n for n in names if n.split(".")[0] in ("kfp", "dvc")], f"{module} imports {names}"


@pytest.mark.parametrize("path", sorted((ROOT / PACKAGE).rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_files_stay_small(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= MAX_LINES
