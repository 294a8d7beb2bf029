"""The package's layers: no import cycle (TYPE_CHECKING and function-level imports included), no module
reaching into another module's private names, and each layer importing only the layers below it."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "nanprobe"

# A layer may import itself and the layers to its right.
LAYERS = {
    "launch": ("cli",),  # the console entry point: the top-level help, else the CLI
    "cli": ("formats", "integrations", "api", "analysis", "engine", "io", "model", "base"),
    "integrations": ("integrations", "formats", "api", "analysis", "engine", "io", "model", "base"),
    "formats": ("formats", "model", "base"),
    "api": ("analysis", "engine", "io", "model", "base"),
    "analysis": ("analysis", "engine", "io", "model", "base"),
    "engine": ("engine", "io", "model", "base"),
    "io": ("io", "model", "base"),
    "model": ("model", "base"),
    "base": ("base",),
}
_BASE = {"errors", "enums", "thresholds", "__init__", "__main__"}


def _name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "base"
    if len(parts) == 2:
        stem = parts[1]
        return "base" if stem in _BASE else stem
    return parts[1]


def _imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) for every import of nanprobe in the file, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("nanprobe")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanprobe") and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists() or \
                    (PKG.parent / sub.replace(".", "/") / "__init__.py").exists()
                found.append((sub, None, node.lineno) if is_module else (node.module, a.name, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        me = _name(path)
        graph[me] = {m for m, _, _ in _imports(path) if m != me and m != "nanprobe"}
    return graph


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt in graph and not state.get(nxt):
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node)


def test_no_private_name_across_modules():
    bad = []
    for path in PKG.rglob("*.py"):
        me = _name(path)
        for module, name, line in _imports(path):
            private_module = any(p.startswith("_") and not p.startswith("__") for p in module.split("."))
            parent = module.rsplit(".", 1)[0]
            if private_module and parent != me.rsplit(".", 1)[0]:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports the private module {module}")
            if name and name.startswith("_") and not name.startswith("__"):
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports the private name {module}.{name}")
    assert not bad, "\n".join(bad)


def test_no_private_attribute_of_another_module():
    bad = []
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanprobe"):
                for a in node.names:
                    sub = PKG.parent / f"{node.module}.{a.name}".replace(".", "/")
                    if sub.with_suffix(".py").exists() or (sub / "__init__.py").exists():
                        aliases.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                aliases |= {a.asname for a in node.names if a.name.startswith("nanprobe") and a.asname}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_layers_import_only_downward():
    bad = []
    for path in PKG.rglob("*.py"):
        me = _name(path)
        if me in ("nanprobe", "nanprobe.__main__"):
            continue
        mine = _layer(me)
        for module, _, line in _imports(path):
            if module == "nanprobe":
                continue
            theirs = _layer(module)
            if theirs not in LAYERS[mine]:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} ({mine}) imports {module} ({theirs})")
    assert not bad, "\n".join(bad)


def test_core_never_imports_typer_or_rich():
    bad = []
    for path in PKG.rglob("*.py"):
        layer = _layer(_name(path))
        if layer in ("cli", "formats", "integrations"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{path.relative_to(PKG.parent)}:{node.lineno} imports {n}"
                    for n in names if n.split(".")[0] in ("typer", "rich")]
    assert not bad, "\n".join(bad)
