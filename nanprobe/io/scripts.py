"""Training scripts as model files: their definitions, without their training.

Many public GAN repositories are flat scripts: argparse, the model classes, the data loader, the
optimizers and the training loop, all at module level (every implementation in
eriklindernoren/PyTorch-GAN is one). Importing such a file runs the training: it parses
nanprobe's own command line, downloads the dataset, writes sample folders and loops for hours.

A file is a script when its module level (outside `if __name__ == "__main__":`) holds a loop or
calls `parse_args()`. For a script nanprobe runs its definitions (every top-level class and
function) and the module-level statements they need, found by following names: the imports,
assignments and in-place calls (`parser.add_argument(...)`) that bind or change a name a
definition reads, and then the names those read, to a fixed point. `parse_args()` sees only the
script's own name, so options take their defaults. Loops never run, nor any block holding one, so
the training, the data loading inside it and the files it writes do not happen; a statement no
definition needs (`os.makedirs("images")`, `dataloader = ...`, `print(opt)`) does not run either.
The statements keep their lines, so tracebacks and the probe's source lines point into the file.
"""
from __future__ import annotations

import ast
import symtable
from pathlib import Path

_LOOPS = (ast.For, ast.AsyncFor, ast.While)
_BLOCKS = (ast.If, ast.Try, ast.With, ast.AsyncWith)


def parse(path: Path) -> tuple[str, ast.Module] | None:
    """The file's source and syntax tree, or None when it cannot be read or parsed (importing it then says why)."""
    try:
        source = path.read_text(encoding="utf-8")
        return source, ast.parse(source, str(path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return None


def is_script(tree: ast.Module) -> bool:
    """Whether the module level (outside `if __name__ == "__main__":`) loops or parses the command line."""
    for stmt in _module_level(tree):
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for node in ast.walk(stmt):  # a loop in a block too: `with tqdm(...) as bar:` around the epochs
            if isinstance(node, _LOOPS):
                return True
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("parse_args", "parse_known_args")):
                return True
    return False


def definitions(tree: ast.Module, source: str, filename: str) -> ast.Module:
    """The statements of a script that its top-level classes and functions need, in the file's order."""
    body = _module_level(tree)
    table = symtable.symtable(source, filename, "exec")
    assigned = {n for s in body if isinstance(s, (ast.Assign, ast.AnnAssign, ast.AugAssign)) for n in _bound(s)}
    keep = [False] * len(body)
    needed: set[str] = set()
    for i, stmt in enumerate(body):
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            keep[i] = True
            needed |= _globals_of(stmt, table) | _module_scope_reads(stmt)
        elif isinstance(stmt, ast.ImportFrom) and (stmt.module == "__future__" or stmt.names[0].name == "*"):
            keep[i] = True
    changed = True
    while changed:
        changed = False
        for i, stmt in enumerate(body):
            if keep[i] or not _runnable(stmt):
                continue
            if (_bound(stmt) | _changed_in_place(stmt, assigned)) & needed:
                keep[i] = changed = True
                needed |= _reads(stmt)
    return ast.Module(body=[s for s, k in zip(body, keep) if k], type_ignores=[])


def _module_level(tree: ast.Module) -> list[ast.stmt]:
    return [s for s in tree.body if not _is_main_guard(s)]


def _is_main_guard(stmt: ast.stmt) -> bool:
    if not isinstance(stmt, ast.If) or not isinstance(stmt.test, ast.Compare) or len(stmt.test.comparators) != 1:
        return False
    sides = (stmt.test.left, stmt.test.comparators[0])
    return (any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
            and any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides))


def _runnable(stmt: ast.stmt) -> bool:
    """Statements that may run: imports, assignments, calls, and if/try/with blocks with no loop inside."""
    if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Expr)):
        return True
    if isinstance(stmt, _BLOCKS):
        return not any(isinstance(n, _LOOPS) for n in ast.walk(stmt))
    return False


def _bound(stmt: ast.stmt) -> set[str]:
    """Names the statement binds at module level."""
    if isinstance(stmt, ast.Import):
        return {(a.asname or a.name).split(".")[0] for a in stmt.names}
    if isinstance(stmt, ast.ImportFrom):
        return {a.asname or a.name for a in stmt.names}
    if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    if isinstance(stmt, _BLOCKS):
        names = set()
        if isinstance(stmt, (ast.With, ast.AsyncWith)):
            names |= {n.id for i in stmt.items if i.optional_vars is not None
                      for n in ast.walk(i.optional_vars) if isinstance(n, ast.Name)}
        for inner in ast.walk(stmt):
            if isinstance(inner, ast.stmt) and inner is not stmt:
                names |= _bound(inner)
        return names
    return set()


def _root(node: ast.expr) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _changed_in_place(stmt: ast.stmt, assigned: set[str]) -> set[str]:
    """Names of objects the statement changes without rebinding them: `parser.add_argument(...)`, `cfg.x = 1`.

    Only objects the script itself assigned count: a call on an imported module (`os.makedirs(...)`)
    changes the world, not the module.
    """
    targets: list[ast.expr] = []
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and isinstance(stmt.value.func, ast.Attribute):
        targets = [stmt.value.func]
    elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        all_targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        targets = [t for t in all_targets if isinstance(t, (ast.Attribute, ast.Subscript))]
    roots = {_root(t) for t in targets}
    return {r for r in roots if r is not None and r in assigned}


def _reads(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _module_scope_reads(stmt: ast.stmt) -> set[str]:
    """What a def or class statement evaluates when it runs: its decorators, bases and defaults."""
    parts: list[ast.AST] = list(getattr(stmt, "decorator_list", []))
    if isinstance(stmt, ast.ClassDef):
        parts += stmt.bases + [k.value for k in stmt.keywords]
    elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
        parts += [d for d in stmt.args.defaults + stmt.args.kw_defaults if d is not None]
    names: set[str] = set()
    for p in parts:
        names |= _reads(p)
    return names


def _globals_of(stmt: ast.stmt, table: symtable.SymbolTable) -> set[str]:
    """Module-level names a def or class reads, from Python's symbol tables (its parameters and locals left out)."""
    name = stmt.name  # type: ignore[attr-defined]  # a def or class statement
    names: set[str] = set()
    for child in table.get_children():
        if child.get_name() == name and child.get_lineno() in _def_lines(stmt):
            names |= _scope_globals(child)
    return names


def _def_lines(stmt: ast.stmt) -> set[int]:
    # A decorated def's table is numbered from its first decorator in some Python versions, from `def` in others.
    return {stmt.lineno} | {d.lineno for d in getattr(stmt, "decorator_list", [])}


def _scope_globals(table: symtable.SymbolTable) -> set[str]:
    names = {s.get_name() for s in table.get_symbols() if s.is_global() and s.is_referenced()}
    for child in table.get_children():
        names |= _scope_globals(child)
    return names
