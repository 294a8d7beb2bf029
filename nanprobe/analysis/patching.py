"""Patches against the user's own files: each fix local to their code, as a libcst transform.

A transform takes the parsed file and where the finding points (the culprit's line, the user's
step function, the module's class) and returns the changed module, or None when the code is not
in a shape it knows; the fix then keeps its config change and snippet. libcst keeps comments and
formatting, so the diff touches only what the fix changes. Transforms are registered in one table
keyed by fix id (TRANSFORMS). nanprobe never writes to the user's files: a Patch holds the text
before and after, and `diff()` gives a unified diff with a/ b/ paths relative to the config's
folder (`git apply` or `patch -p1` from there). `patched_code` copies the files to a temporary
folder, applies a patch there and lets a replay import the copies under their own module names.
"""
from __future__ import annotations

import difflib
import inspect
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

from nanprobe.analysis.fixes import amp_scaler, filled
from nanprobe.enums import Precision
from nanprobe.thresholds import SAFE_EPS

# ---------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Site:
    """Where a transform looks in one of the user's files."""

    path: Path
    """The file (absolute)."""
    rel: str
    """Its path relative to the config's folder, as the diff names it."""
    line: int | None
    """The culprit's line in this file (the finding's source), or None."""
    function: str | None
    """The user's critic step function (loss.step) when it is defined in this file."""
    precision: Precision
    """The failing run's precision (picks the eps that survives it)."""
    class_name: str | None = None
    """fp32-module: the class of the module at the finding, when it is defined in this file."""
    built_at: tuple = ()
    """fp32-module: lines of this file where that module is constructed (a library layer)."""


@dataclass(frozen=True)
class FilePatch:
    """One file's text before and after a fix."""

    rel: str
    """Path relative to the config's folder."""
    before: str
    """The user's file as it is."""
    after: str
    """The file with the fix applied."""


@dataclass(frozen=True)
class Patch:
    """A fix applied to the user's own files."""

    fix_id: str
    """The catalogue id."""
    files: tuple[FilePatch, ...]
    """Each changed file."""
    overrides: dict = field(default_factory=dict)
    """Config changes the patched code is meant to run with (gp-scaled: a GradScaler)."""

    def diff(self) -> str:
        """The unified diff, a/ b/ prefixed, relative to the config's folder."""
        return "".join(_unified(f.rel, f.before, f.after) for f in self.files)

    def excerpt(self) -> str:
        """The changed lines as they read after the fix (with their hunk's context), for the snippet."""
        out = []
        for f in self.files:
            new = f.after.splitlines()
            ops = difflib.SequenceMatcher(None, f.before.splitlines(), new, autojunk=False).get_opcodes()
            for tag, _, _, j1, j2 in ops:
                if tag in ("replace", "insert"):
                    out.append("\n".join(new[j1:j2]))
        return _dedent("\n".join(out))


@dataclass(frozen=True)
class Transform:
    """A registered code change for one fix id."""

    fix_id: str
    """The catalogue id it implements."""
    where: str
    """Which file it changes: "step" (the loss.step file) or "models" (the critic's file) or "any"."""
    edit: Callable[[cst.Module, Site], cst.Module | None]
    """The change, or None when the code is not in a shape it knows."""
    overrides: tuple = ()
    """(dotted key, value): config changes the patched code needs, written as the fix's own Apply writes them
    ("{amp_scaler}": a GradScaler where the precision needs one and none is on)."""
    culprit: bool = True
    """The transform starts from the finding's source line (False: from the step function)."""

    def overrides_for(self, precision: Precision, scaler_on: bool) -> dict:
        """The config changes for a run in `precision`, with a GradScaler already on or not."""
        return filled(self.overrides, {"amp_scaler": amp_scaler(precision, scaler_on)})


def _unified(rel: str, before: str, after: str) -> str:
    lines = difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                 f"a/{rel}", f"b/{rel}", n=3)
    text = ""
    for line in lines:
        text += line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
    return text


def _dedent(text: str) -> str:
    lines = text.splitlines()
    pad = min((len(x) - len(x.lstrip()) for x in lines if x.strip()), default=0)
    return "\n".join(x[pad:] for x in lines)


# ------------------------------------------------------------------------------------- helpers


def _name(node: cst.CSTNode) -> str:
    """A dotted name for a Name/Attribute chain ("torch.autograd.grad"), "" otherwise."""
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr.value}" if base else f"?.{node.attr.value}"
    return ""


def _callee(call: cst.Call) -> str:
    """The called function's last name: torch.sqrt -> sqrt, x.sqrt -> sqrt, F.softplus -> softplus."""
    f = call.func
    if isinstance(f, cst.Attribute):
        return f.attr.value
    return f.value if isinstance(f, cst.Name) else ""


def _is_method(call: cst.Call) -> bool:
    """x.sqrt() rather than torch.sqrt(x): the receiver is not a module name."""
    f = call.func
    return isinstance(f, cst.Attribute) and _name(f.value) not in (
        "torch", "F", "nn.functional", "torch.nn.functional", "functional", "math", "np", "numpy")


def _lit(x: float) -> str:
    """1e-4 rather than 0.0001: an eps reads as one."""
    mant, _, exp = f"{x:.0e}".partition("e")
    text = f"{mant}e{int(exp)}"
    return text if float(text) == x else repr(x)


def _expr(code: str) -> cst.BaseExpression:
    return cst.parse_expression(code)


def _code(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)


def _atom(node: cst.BaseExpression) -> str:
    """Source of an expression, parenthesised when it would bind loosely."""
    text = _code(node)
    simple = (cst.Name, cst.Attribute, cst.Call, cst.Subscript, cst.Integer, cst.Float)
    return text if isinstance(node, simple) or node.lpar else f"({text})"


def _float(node: cst.BaseExpression) -> float | None:
    if isinstance(node, (cst.Float, cst.Integer)):
        try:
            return float(node.value)
        except ValueError:
            return None
    return None


def _functional(module: cst.Module) -> str:
    """How this file spells torch.nn.functional (its own alias when it imports one)."""
    for stmt in module.body:
        for small in stmt.body if isinstance(stmt, cst.SimpleStatementLine) else ():
            if isinstance(small, cst.Import):
                for alias in small.names:
                    if _name(alias.name) == "torch.nn.functional" and alias.asname is not None:
                        return alias.asname.name.value  # type: ignore[union-attr]  # libcst node type checked by the caller
            if isinstance(small, cst.ImportFrom) and _name(small.module or cst.Name("")) == "torch.nn" \
                    and not isinstance(small.names, cst.ImportStar):
                for alias in small.names:
                    if alias.name.value == "functional":
                        return alias.asname.name.value if alias.asname else "functional"  # type: ignore[union-attr]  # libcst node type checked by the caller
    return "torch.nn.functional"


def _with_positions(module: cst.Module, transformer_cls, *args):
    wrapper = MetadataWrapper(module)
    t = transformer_cls(*args)
    out = wrapper.visit(t)
    return out, t


class _AtLine(cst.CSTTransformer):
    """Base: knows each node's line span."""

    METADATA_DEPENDENCIES = (PositionProvider,)

    def __init__(self, line: int | None):
        super().__init__()
        self.line = line
        self.changed = 0

    def on_line(self, node: cst.CSTNode) -> bool:
        if self.line is None:
            return True
        pos = self.get_metadata(PositionProvider, node)
        return pos.start.line <= self.line <= pos.end.line


def _functions(module: cst.Module) -> list[tuple[cst.FunctionDef, tuple]]:
    """Every function with the chain of its enclosing classes/functions (for lookups by name)."""
    out = []

    class V(cst.CSTVisitor):
        def __init__(self):
            self.stack = []

        def visit_FunctionDef(self, node):
            out.append((node, tuple(self.stack)))
            self.stack.append(node)

        def leave_FunctionDef(self, node):
            self.stack.pop()

        def visit_ClassDef(self, node):
            self.stack.append(node)

        def leave_ClassDef(self, node):
            self.stack.pop()

    module.visit(V())
    return out


def _lines_of(module: cst.Module, node: cst.CSTNode) -> tuple[int, int]:
    wrapper = MetadataWrapper(module, unsafe_skip_copy=True)
    pos = wrapper.resolve(PositionProvider)[node]
    return pos.start.line, pos.end.line


def _enclosing(module: cst.Module, line: int | None, name: str | None) -> cst.FunctionDef | None:
    """The function named `name`, else the innermost function around `line`."""
    funcs = _functions(module)
    if name:
        for f, parents in funcs:
            if f.name.value == name and not any(isinstance(p, cst.FunctionDef) for p in parents):
                return f
    if line is not None:
        wrapper = MetadataWrapper(module, unsafe_skip_copy=True)
        pos = wrapper.resolve(PositionProvider)
        best = None
        for f, _ in funcs:
            p = pos[f]
            if p.start.line <= line <= p.end.line and (best is None or pos[best].start.line <= p.start.line):
                best = f
        return best
    return None


class _Within(cst.CSTTransformer):
    """Applies `inner` to one function only (the others are left alone)."""

    def __init__(self, target: cst.FunctionDef, inner: cst.CSTTransformer):
        super().__init__()
        self.target, self.inner = target, inner
        self.result = None

    def on_visit(self, node):
        return node is not self.target and super().on_visit(node)

    def on_leave(self, original, updated):
        if original is self.target:
            self.result = original.visit(self.inner)
            return self.result
        return super().on_leave(original, updated)


def _in_function(module: cst.Module, fn: cst.FunctionDef, inner: cst.CSTTransformer) -> cst.Module:
    return module.visit(_Within(fn, inner))


# ---------------------------------------------------------------------------------- safe-norm

_ROOTS = ("sqrt", "rsqrt")


class _SafeRoot(_AtLine):
    """sqrt(s) / rsqrt(s) / s.sqrt() / s ** 0.5 at the line -> the same of (s + eps), or a too-small eps raised."""

    def __init__(self, line: int | None, eps: float):
        super().__init__(line)
        self.eps = eps

    def _safe(self, arg: cst.BaseExpression) -> cst.BaseExpression | None:
        lit = _lit(self.eps)
        if isinstance(arg, cst.BinaryOperation) and isinstance(arg.operator, cst.Add) and not arg.lpar:
            for side in ("right", "left"):
                v = _float(getattr(arg, side))
                if v is not None:
                    if v >= self.eps:
                        return None  # an eps that survives is there already
                    return arg.with_changes(**{side: cst.Float(lit)})
        return _expr(f"{_atom(arg)} + {lit}")

    def leave_Call(self, original, updated):
        if _callee(updated) not in _ROOTS or not self.on_line(original):
            return updated
        if _is_method(updated):
            new = self._safe(updated.func.value)
            if new is None:
                return updated
            self.changed += 1
            return updated.with_changes(func=updated.func.with_changes(value=_expr(f"({_code(new)})")))
        if not updated.args:
            return updated
        new = self._safe(updated.args[0].value)
        if new is None:
            return updated
        self.changed += 1
        return updated.with_changes(args=[updated.args[0].with_changes(value=new), *updated.args[1:]])

    def leave_BinaryOperation(self, original, updated):
        if isinstance(updated.operator, cst.Power) and _float(updated.right) in (0.5, -0.5) and self.on_line(original):
            new = self._safe(updated.left)
            if new is not None:
                self.changed += 1
                return updated.with_changes(left=_expr(f"({_code(new)})"))
        return updated


def _safe_norm(module: cst.Module, site: Site) -> cst.Module | None:
    eps = SAFE_EPS[site.precision.value]
    out, t = _with_positions(module, _SafeRoot, site.line, eps)
    if t.changed:
        return out
    fn = _enclosing(module, site.line, None)  # the culprit's line holds no root: the roots of its function
    if fn is None:
        return None
    start, end = _lines_of(module, fn)
    for line in range(start, end + 1):
        out, t = _with_positions(module, _SafeRoot, line, eps)
        if t.changed:
            return out
    return None


# -------------------------------------------------------------------------------- logits-loss


def _sigmoid_arg(node: cst.BaseExpression, sigmoids: dict) -> cst.BaseExpression | None:
    """x for sigmoid(x), x.sigmoid(), or a name assigned from one; else None."""
    if isinstance(node, cst.Call) and _callee(node) == "sigmoid":
        if _is_method(node):
            return node.func.value  # type: ignore[attr-defined]  # libcst node type checked by the caller
        return node.args[0].value if node.args else None
    if isinstance(node, cst.Name) and node.value in sigmoids:
        return cst.Name(sigmoids[node.value])
    return None


def _one_minus(node: cst.BaseExpression) -> cst.BaseExpression | None:
    if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Subtract) and _float(node.left) == 1.0:
        return node.right
    return None


def _strip_eps(node: cst.BaseExpression) -> cst.BaseExpression:
    """log(sigmoid(x) + 1e-8): the eps is a workaround the logits form does not need."""
    if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Add) and _float(node.right) is not None:
        return node.left.with_changes(lpar=[], rpar=[]) if node.left.lpar and not node.lpar else node.left
    return node


class _Logits(cst.CSTTransformer):
    """log(sigmoid(x)) -> -softplus(-x); log(1 - sigmoid(x)) -> -softplus(x); BCE on sigmoid -> BCE with logits."""

    def __init__(self, functional: str, sigmoids: dict, bce_names: set):
        super().__init__()
        self.F, self.sigmoids, self.bce_names = functional, sigmoids, bce_names
        self.changed = 0

    def _log_of(self, call: cst.Call) -> cst.BaseExpression | None:
        if _callee(call) != "log":
            return None
        arg = call.func.value if _is_method(call) else (call.args[0].value if call.args else None)  # type: ignore[attr-defined]  # libcst node type checked by the caller
        if arg is None:
            return None
        arg = _strip_eps(arg)
        x = _sigmoid_arg(arg, self.sigmoids)
        if x is not None:
            return _expr(f"(-{self.F}.softplus(-{_atom(x)}))")
        inner = _one_minus(arg)
        x = _sigmoid_arg(inner, self.sigmoids) if inner is not None else None
        if x is not None:
            return _expr(f"(-{self.F}.softplus({_code(x)}))")
        return None

    def leave_Call(self, original, updated):
        new = self._log_of(updated)
        if new is not None:
            self.changed += 1
            return new
        f = updated.func
        if isinstance(f, cst.Attribute) and f.attr.value in ("mean", "sum") and _negated(f.value) is not None:
            # (-x).mean() -> -x.mean(): a linear reduction commutes with the sign
            return cst.UnaryOperation(cst.Minus(), updated.with_changes(func=f.with_changes(value=_negated(f.value))))
        name = _callee(updated)
        if name == "binary_cross_entropy" and not _is_method(updated) and updated.args:
            x = _sigmoid_arg(updated.args[0].value, self.sigmoids)
            if x is not None:
                self.changed += 1
                func = _expr(f"{_name(updated.func.value)}.binary_cross_entropy_with_logits") \
                    if isinstance(updated.func, cst.Attribute) else cst.Name("binary_cross_entropy_with_logits")
                return updated.with_changes(func=func, args=[updated.args[0].with_changes(value=x), *updated.args[1:]])
        return updated

    def leave_UnaryOperation(self, original, updated):
        # -(-softplus(...)) -> softplus(...)
        inner = _negated(updated.expression)
        if isinstance(updated.operator, cst.Minus) and inner is not None and not updated.lpar:
            return inner
        return updated

    def leave_BinaryOperation(self, original, updated):
        # a - (-b) -> a + b; a + (-b) -> a - b
        inner = _negated(updated.right)
        if inner is None or not isinstance(updated.operator, (cst.Add, cst.Subtract)):
            return updated
        op = cst.Add if isinstance(updated.operator, cst.Subtract) else cst.Subtract
        return updated.with_changes(operator=op(whitespace_before=updated.operator.whitespace_before,
                                                whitespace_after=updated.operator.whitespace_after), right=inner)


class _BceLogits(cst.CSTTransformer):
    """crit = nn.BCELoss() used only as crit(sigmoid(x), y) -> crit = nn.BCEWithLogitsLoss(), crit(x, y)."""

    def __init__(self, names: set):
        super().__init__()
        self.names = names
        self.changed = 0

    def leave_Call(self, original, updated):
        if _name(updated.func) in self.names and updated.args:
            x = _sigmoid_arg(updated.args[0].value, {})
            if x is not None:
                self.changed += 1
                return updated.with_changes(args=[updated.args[0].with_changes(value=x), *updated.args[1:]])
        return updated

    def leave_Assign(self, original, updated):
        if len(updated.targets) == 1 and _name(updated.targets[0].target) in self.names \
                and isinstance(updated.value, cst.Call) and _callee(updated.value) == "BCELoss":
            func = _code(updated.value.func)[: -len("BCELoss")] + "BCEWithLogitsLoss"
            return updated.with_changes(value=updated.value.with_changes(func=_expr(func)))
        return updated


def _bce_only_on_sigmoid(module: cst.Module) -> set:
    """Names bound to BCELoss() whose every call passes a sigmoid (so the logits version is the same loss)."""
    names = set(_assigned_from(module, lambda v: isinstance(v, cst.Call) and _callee(v) == "BCELoss"))
    calls: dict = {n: [] for n in names}

    class V(cst.CSTVisitor):
        def visit_Call(self, node):
            n = _name(node.func)
            if n in calls:
                calls[n].append(bool(node.args) and _sigmoid_arg(node.args[0].value, {}) is not None)

    module.visit(V())
    return {n for n, hits in calls.items() if hits and all(hits)}


def _negated(node: cst.BaseExpression) -> cst.BaseExpression | None:
    """x for -x or (-x); None otherwise."""
    if isinstance(node, cst.UnaryOperation) and isinstance(node.operator, cst.Minus):
        return node.expression
    return None


def _assigned_from(fn: cst.CSTNode, pred) -> dict:
    """name -> value of simple `name = value` assignments in fn whose value satisfies pred."""
    out = {}

    class V(cst.CSTVisitor):
        def visit_Assign(self, node):
            if len(node.targets) == 1 and isinstance(node.targets[0].target, (cst.Name, cst.Attribute)) \
                    and pred(node.value):
                out[_name(node.targets[0].target)] = node.value

    fn.visit(V())
    return out


class _SplitSigmoid(cst.CSTTransformer):
    """d = sigmoid(critic(x)) -> d_logits = critic(x); d = sigmoid(d_logits): the logits get a name."""

    def __init__(self, names: dict, unused: AbstractSet = frozenset()):
        super().__init__()
        self.names = names  # name -> logits name
        self.unused = unused  # names no longer read once the loss takes the logits

    def leave_SimpleStatementLine(self, original, updated):
        if len(updated.body) != 1 or not isinstance(updated.body[0], cst.Assign):
            return updated
        a = updated.body[0]
        if len(a.targets) != 1 or not isinstance(a.targets[0].target, cst.Name):
            return updated
        name = a.targets[0].target.value
        if name not in self.names:
            return updated
        x = _sigmoid_arg(a.value, {})
        if x is None or isinstance(x, cst.Name):
            return updated
        logits = self.names[name]
        first = updated.with_changes(body=[cst.Assign([cst.AssignTarget(cst.Name(logits))], x)],
                                     trailing_whitespace=cst.TrailingWhitespace())
        if name in self.unused:  # nothing reads the probabilities any more: the logits alone
            return updated.with_changes(body=[cst.Assign([cst.AssignTarget(cst.Name(logits))], x)])
        call = a.value
        new_call = call.with_changes(func=call.func.with_changes(value=cst.Name(logits))) if _is_method(call) else \
            call.with_changes(args=[call.args[0].with_changes(value=cst.Name(logits)), *call.args[1:]])
        second = updated.with_changes(body=[a.with_changes(value=new_call)], leading_lines=[])
        return cst.FlattenSentinel([first, second])


def _logits_loss(module: cst.Module, site: Site) -> cst.Module | None:
    fn = _enclosing(module, site.line, site.function) or _enclosing(module, None, site.function)
    scope = fn if fn is not None else module
    sig = _assigned_from(scope, lambda v: _sigmoid_arg(v, {}) is not None)
    sigmoids = {}
    for name, value in sig.items():
        x = _sigmoid_arg(value, {})
        sigmoids[name] = x.value if isinstance(x, cst.Name) else f"{name.replace('.', '_')}_logits"
    split = {n: v for n, v in sigmoids.items() if n.isidentifier() and v != n and v.endswith("_logits")}
    t = _Logits(_functional(module), sigmoids, set())
    if fn is not None:
        out = _in_function(module, fn, t)
    else:
        out = module.visit(t)
    bce = _BceLogits(_bce_only_on_sigmoid(out))
    out = out.visit(bce) if bce.names else out
    if not t.changed and not bce.changed:
        return None
    if split and fn is not None:
        used = {n for n in split if f"{split[n]}" in out.code}
        if used:
            fn2 = _enclosing(out, None, fn.name.value)
            reads = _ordered_names(fn2)  # type: ignore[arg-type]  # not None on this path
            # A name read only where it is assigned (once) is read nowhere else now.
            unused = {n for n in used if reads.count(n) <= 1}
            out = _in_function(out, fn2, _SplitSigmoid({n: split[n] for n in used}, unused))  # type: ignore[arg-type]  # not None on this path
    return out


# --------------------------------------------------------------------------- penalty (gp-*)


def _grad_calls(node: cst.CSTNode) -> list[cst.Call]:
    found = []

    class V(cst.CSTVisitor):
        def visit_Call(self, call):
            n = _name(call.func)
            if n.endswith("autograd.grad") or n == "grad" and any(a.keyword and a.keyword.value == "create_graph"
                                                                  for a in call.args):
                found.append(call)

    node.visit(V())
    return found


def _arg(call: cst.Call, keyword: str, index: int) -> cst.BaseExpression | None:
    for a in call.args:
        if a.keyword is not None and a.keyword.value == keyword:
            return a.value
    positional = [a for a in call.args if a.keyword is None]
    return positional[index].value if len(positional) > index else None


def _names_in(node: cst.CSTNode) -> set:
    names = set()

    class V(cst.CSTVisitor):
        def visit_Name(self, n):
            names.add(n.value)

    node.visit(V())
    return names


def _targets(stmt: cst.CSTNode) -> set:
    out: set = set()
    for small in getattr(stmt, "body", ()) if isinstance(stmt, cst.SimpleStatementLine) else ():
        if isinstance(small, cst.Assign):
            for t in small.targets:
                out |= _names_in(t.target) if isinstance(t.target, (cst.Tuple, cst.List)) else \
                    ({t.target.value} if isinstance(t.target, cst.Name) else set())
        elif isinstance(small, (cst.AugAssign, cst.AnnAssign)) and isinstance(small.target, cst.Name):
            out.add(small.target.value)
    return out


def _contains(stmt: cst.CSTNode, target: cst.CSTNode) -> bool:
    hit = []

    class V(cst.CSTVisitor):
        def on_visit(self, node):
            if node is target:
                hit.append(True)
            return not hit

    stmt.visit(V())
    return bool(hit)


@dataclass
class _Penalty:
    """The statements of the penalty inside one block of the user's code."""

    fn: cst.FunctionDef
    block: cst.IndentedBlock
    start: int
    grad: int
    end: int
    call: cst.Call
    inputs: str | None
    device: str


def _penalty(module: cst.Module, site: Site) -> _Penalty | None:
    fn = _enclosing(module, None, site.function)
    calls = _grad_calls(fn) if fn is not None else []
    if not calls:  # the penalty lives in a helper of its own
        calls = _grad_calls(module)
        if len(calls) != 1:
            return None
        fn = None
        for f, _ in _functions(module):
            if _contains(f, calls[0]) and (fn is None or _contains(fn, f)):
                fn = f
    if fn is None:
        return None
    call = calls[0]
    # The block that holds the statement with the call, and the statement's index in it.
    block = None

    class V(cst.CSTVisitor):
        def visit_IndentedBlock(self, node):
            nonlocal block
            for s in node.body:
                if _contains(s, call) and not isinstance(s, cst.BaseCompoundStatement):
                    block = node

    fn.visit(V())
    if block is None:
        return None
    stmts = list(block.body)
    g = next(i for i, s in enumerate(stmts) if _contains(s, call))
    inputs = _arg(call, "inputs", 1)
    outputs = _arg(call, "outputs", 0)
    wanted = set()
    if isinstance(inputs, cst.Name):
        wanted.add(inputs.value)
    if isinstance(outputs, cst.Name):
        wanted.add(outputs.value)
    start = g
    for i in range(g - 1, -1, -1):
        s = stmts[i]
        if not isinstance(s, cst.SimpleStatementLine):
            break
        defines = _targets(s)
        touches = isinstance(inputs, cst.Name) and any(
            isinstance(x, cst.Expr) and inputs.value in _names_in(x) for x in s.body)
        if defines & wanted or touches:
            start = i  # the interpolation (or the input made to require grad) and the critic call on it
    # Statements after the call that use what the penalty computed, up to the next that does not (or a return).
    defined = set().union(*(_targets(s) for s in stmts[start:g + 1]))
    end = g
    for i in range(g + 1, len(stmts)):
        s = stmts[i]
        if not isinstance(s, cst.SimpleStatementLine) or any(isinstance(x, cst.Return) for x in s.body):
            break
        if not (_names_in(s) & defined):
            break
        defined |= _targets(s)
        end = i
    params = [p.name.value for p in fn.params.params]
    first = stmts[start]
    used = [n for n in _ordered_names(first) if n in params]
    device = used[0] if used else (inputs.value if isinstance(inputs, cst.Name) and start < g else
                                   (params[2] if len(params) > 2 else "x"))
    return _Penalty(fn, block, start, g, end, call, inputs.value if isinstance(inputs, cst.Name) else None, device)


def _ordered_names(node: cst.CSTNode) -> list:
    names = []

    class V(cst.CSTVisitor):
        def visit_Name(self, n):
            names.append(n.value)

    node.visit(V())
    return names


class _FloatInput(cst.CSTTransformer):
    """x_hat = expr.requires_grad_(True) -> expr.float().requires_grad_(True); x_hat = expr -> (expr).float()."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.done = False

    def leave_Assign(self, original, updated):
        if self.done or len(updated.targets) != 1 or _name(updated.targets[0].target) != self.name:
            return updated
        v = updated.value
        self.done = True
        if isinstance(v, cst.Call) and _callee(v) == "requires_grad_" and isinstance(v.func, cst.Attribute):
            inner = v.func.value
            floated = _expr(f"{_atom(inner)}.float()")
            return updated.with_changes(value=v.with_changes(func=v.func.with_changes(value=floated)))
        return updated.with_changes(value=_expr(f"{_atom(v)}.float()"))


def _replace_block(module: cst.Module, block: cst.IndentedBlock, body: list) -> cst.Module:
    class T(cst.CSTTransformer):
        def leave_IndentedBlock(self, original, updated):
            return updated.with_changes(body=body) if original is block else updated

    return module.visit(T())


def _comment(text: str) -> cst.EmptyLine:
    return cst.EmptyLine(comment=cst.Comment(f"# {text}"))


def _gp_fp32(module: cst.Module, site: Site) -> cst.Module | None:
    p = _penalty(module, site)
    if p is None:
        return None
    stmts = list(p.block.body)
    region = stmts[p.start:p.end + 1]
    if p.inputs is not None and any(p.inputs in _targets(s) for s in region):
        floated = []
        t = _FloatInput(p.inputs)
        for s in region:
            floated.append(s.visit(t) if not t.done and p.inputs in _targets(s) else s)
        region = floated  # type: ignore[assignment]  # libcst node type checked by the caller
    lead = region[0].leading_lines  # type: ignore[attr-defined]  # libcst node type checked by the caller
    region = [region[0].with_changes(leading_lines=[]), *region[1:]]
    header = _expr(f"torch.autocast(device_type={p.device}.device.type, enabled=False)")
    wrapped = cst.With(items=[cst.WithItem(header)], body=cst.IndentedBlock(body=region),
                       leading_lines=[*lead, _comment("nanprobe gp-fp32: the penalty in fp32, outside autocast "
                                                      "(its input gradient underflows in low precision)")])
    return _replace_block(module, p.block, [*stmts[:p.start], wrapped, *stmts[p.end + 1:]])


def _gp_scaled(module: cst.Module, site: Site) -> cst.Module | None:
    p = _penalty(module, site)
    if p is None:
        return None
    stmts = list(p.block.body)
    grad_stmt = stmts[p.grad]
    if not (isinstance(grad_stmt, cst.SimpleStatementLine) and len(grad_stmt.body) == 1
            and isinstance(grad_stmt.body[0], cst.Assign) and len(grad_stmt.body[0].targets) == 1
            and isinstance(grad_stmt.body[0].targets[0].target, cst.Name)):
        return None
    target = grad_stmt.body[0].targets[0].target.value
    outputs = _arg(p.call, "outputs", 0)
    if outputs is None or _uses_scaler(p.call):
        return None  # the recipe is there already
    call = p.call

    class Scale(cst.CSTTransformer):
        def leave_Call(self, original, updated):
            if original is not call:
                return updated
            args = []
            for i, a in enumerate(updated.args):
                is_out = (a.keyword is not None and a.keyword.value == "outputs") or (a.keyword is None and i == 0)
                args.append(a.with_changes(value=_expr(f"scaler.scale({_code(a.value)}) if scaler is not None "
                                                       f"else {_atom(a.value)}")) if is_out else a)
            return updated.with_changes(args=args)

    new_grad = grad_stmt.visit(Scale())
    unscale = cst.parse_statement(f"if scaler is not None:\n    {target} = {target} * (1.0 / scaler.get_scale())\n")
    unscale = unscale.with_changes(leading_lines=[_comment(
        "nanprobe gp-scaled: the AMP recipe, scaled outputs into autograd.grad, then the true gradient")])
    module = _replace_block(module, p.block, [*stmts[:p.grad], new_grad, unscale, *stmts[p.grad + 1:]])
    return _add_scaler_param(module, p.fn.name.value, site.function)


def _uses_scaler(call: cst.Call) -> bool:
    return "scaler" in _names_in(call)


def _add_scaler_param(module: cst.Module, helper: str, step: str | None) -> cst.Module:
    """`scaler=None` on the function with the penalty, and on the step that calls it, which passes it on."""

    class T(cst.CSTTransformer):
        def __init__(self):
            super().__init__()
            self.depth = 0

        def visit_FunctionDef(self, node):
            self.depth += 1

        def leave_FunctionDef(self, original, updated):
            self.depth -= 1
            name = updated.name.value
            if self.depth or name not in (helper, step):
                return updated
            params = updated.params
            if any(q.name.value == "scaler" for q in (*params.params, *params.kwonly_params)):
                return updated
            new = cst.Param(cst.Name("scaler"), default=cst.Name("None"),
                            equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace("")))
            if params.star_arg is not cst.MaybeSentinel.DEFAULT or params.kwonly_params:
                return updated.with_changes(params=params.with_changes(kwonly_params=[*params.kwonly_params, new]))
            last = params.params[-1] if params.params else None
            if last is not None and last.comma is cst.MaybeSentinel.DEFAULT:
                fixed = [*params.params[:-1],
                         last.with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))]
            else:
                fixed = list(params.params)
            return updated.with_changes(params=params.with_changes(params=[*fixed, new]))

        def leave_Call(self, original, updated):
            if helper != step and _name(updated.func) == helper and not any(
                    a.keyword is not None and a.keyword.value == "scaler" for a in updated.args):
                kw = cst.Arg(cst.Name("scaler"), keyword=cst.Name("scaler"),
                             equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace("")))
                args = list(updated.args)
                if args and args[-1].comma is cst.MaybeSentinel.DEFAULT:
                    args[-1] = args[-1].with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))
                return updated.with_changes(args=[*args, kw])
            return updated

    return module.visit(T())


# ------------------------------------------------------------------------------- fp32-module

_FP32_HELPER = '''

def _nanprobe_fp32(module):
    """nanprobe fp32-module: run `module` outside autocast on fp32 inputs (same weights, same state_dict keys)."""

    class FP32(type(module)):
        def forward(self, *args, **kwargs):
            device = next((a.device.type for a in args if torch.is_tensor(a)), "cuda")
            args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
            with torch.autocast(device_type=device, enabled=False):
                return super().forward(*args, **kwargs)

    FP32.__name__ = FP32.__qualname__ = "FP32" + type(module).__name__
    module.__class__ = FP32
    return module
'''


class _Fp32Forward(cst.CSTTransformer):
    """The class's forward body run under autocast(enabled=False) with its tensor inputs cast to fp32."""

    def __init__(self, class_name: str):
        super().__init__()
        self.class_name = class_name
        self.in_class = 0
        self.done = False

    def visit_ClassDef(self, node):
        if node.name.value == self.class_name:
            self.in_class += 1

    def leave_ClassDef(self, original, updated):
        if original.name.value == self.class_name:
            self.in_class -= 1
        return updated

    def leave_FunctionDef(self, original, updated):
        if not self.in_class or updated.name.value != "forward" or self.done:
            return updated
        params = [q.name.value for q in updated.params.params][1:]
        if not params:
            return updated
        x = params[0]
        body = list(updated.body.body)
        doc = []
        if body and isinstance(body[0], cst.SimpleStatementLine) and isinstance(body[0].body[0], cst.Expr) \
                and isinstance(body[0].body[0].value, (cst.SimpleString, cst.ConcatenatedString)):
            doc, body = body[:1], body[1:]
        cast = cst.parse_statement(f"{x} = {x}.float()\n")
        lead = body[0].leading_lines if body else []
        body = [cast, *([body[0].with_changes(leading_lines=[])] if body else []), *body[1:]]
        wrapped = cst.With(items=[cst.WithItem(_expr(f"torch.autocast(device_type={x}.device.type, enabled=False)"))],
                           body=cst.IndentedBlock(body=body),
                           leading_lines=[*lead, _comment(f"nanprobe fp32-module: {self.class_name} in fp32, "
                                                          "outside autocast (its values leave the low dtype's range)")])
        self.done = True
        return updated.with_changes(body=updated.body.with_changes(body=[*doc, wrapped]))


class _WrapBuilt(_AtLine):
    """The layer constructed at the line -> _nanprobe_fp32(layer)."""

    def __init__(self, line: int, cls: str):
        super().__init__(line)
        self.cls = cls

    def leave_Call(self, original, updated):
        if _callee(updated) != self.cls or not self.on_line(original):
            return updated
        self.changed += 1
        return cst.Call(cst.Name("_nanprobe_fp32"), [cst.Arg(updated)])


def _fp32_module(module: cst.Module, site: Site) -> cst.Module | None:
    if site.class_name:
        t = _Fp32Forward(site.class_name)
        out = module.visit(t)
        return out if t.done else None
    if not site.built_at:
        return None
    line, cls = site.built_at
    out, t = _with_positions(module, _WrapBuilt, line, cls)
    if not t.changed:
        return None
    helper = cst.parse_module(_FP32_HELPER).body
    body = list(out.body)
    # After the imports, so the helper sees torch.
    at = 0
    for i, s in enumerate(body):
        if isinstance(s, cst.SimpleStatementLine) and any(isinstance(x, (cst.Import, cst.ImportFrom)) for x in s.body):
            at = i + 1
    return out.with_changes(body=[*body[:at], *helper, *body[at:]])


# ---------------------------------------------------------------------- adam-eps, master-weights


class _OptimizerEps(cst.CSTTransformer):
    def __init__(self, eps: float):
        super().__init__()
        self.eps, self.changed = eps, 0

    def leave_Call(self, original, updated):
        if _callee(updated) not in ("Adam", "AdamW", "RMSprop") or "optim" not in _name(updated.func):
            return updated
        lit = cst.Float(_lit(self.eps))
        args = list(updated.args)
        for i, a in enumerate(args):
            if a.keyword is not None and a.keyword.value == "eps":
                v = _float(a.value)
                if v is not None and v >= self.eps:
                    return updated
                args[i] = a.with_changes(value=lit)
                self.changed += 1
                return updated.with_changes(args=args)
        if args and args[-1].comma is cst.MaybeSentinel.DEFAULT:
            args[-1] = args[-1].with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))
        args.append(cst.Arg(lit, keyword=cst.Name("eps"),
                            equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace(""))))
        self.changed += 1
        return updated.with_changes(args=args)


def _adam_eps(module: cst.Module, site: Site) -> cst.Module | None:
    t = _OptimizerEps(SAFE_EPS[Precision.FP16.value])
    out = module.visit(t)
    return out if t.changed else None


class _NoHalf(cst.CSTTransformer):
    """model.half() / model.to(torch.float16) where a model is built -> the model kept in fp32."""

    def __init__(self):
        super().__init__()
        self.changed = 0

    def leave_Call(self, original, updated):
        if not isinstance(updated.func, cst.Attribute) or updated.args and _callee(updated) == "half":
            return updated
        if _callee(updated) == "half" or (_callee(updated) == "to" and len(updated.args) == 1
                                           and _name(updated.args[0].value) in ("torch.float16", "torch.half",
                                                                                 "torch.bfloat16")):
            self.changed += 1
            return updated.func.value
        return updated


def _master_weights(module: cst.Module, site: Site) -> cst.Module | None:
    t = _NoHalf()
    out = module.visit(t)
    return out if t.changed else None


TRANSFORMS: dict[str, Transform] = {t.fix_id: t for t in (
    Transform("safe-norm", "any", _safe_norm),
    Transform("logits-loss", "any", _logits_loss),
    Transform("gp-fp32", "step", _gp_fp32, culprit=False),
    Transform("gp-scaled", "step", _gp_scaled, (("train.grad_scaler", True),), culprit=False),
    Transform("fp32-module", "models", _fp32_module, culprit=False),
    Transform("adam-eps", "any", _adam_eps, (("train.eps", SAFE_EPS[Precision.FP16.value]),), culprit=False),
    Transform("master-weights", "any", _master_weights,
              (("precision.mode", "amp"), ("train.grad_scaler", "{amp_scaler}")), culprit=False),
)}
"""Fix id -> its code change. A fix without an entry (or whose transform finds nothing) keeps its config change."""


# ------------------------------------------------------------------------------ user's files


@dataclass(frozen=True)
class UserCode:
    """The user's own files a patch may change, from the config."""

    base: Path
    """The config's folder (diff paths are relative to it)."""
    step: Path | None
    """The loss.step file."""
    step_name: str | None
    """The loss.step function's name."""
    models: tuple[Path, ...]
    """The critic's (and generator's) files."""

    def files(self) -> tuple[Path, ...]:
        seen = []
        for p in ((self.step,) if self.step else ()) + self.models:
            if p not in seen:
                seen.append(p)
        return tuple(seen)


def _ref_file(base: Path, ref) -> tuple[Path | None, str | None]:
    if isinstance(ref, str):
        target, _, attr = ref.rpartition(":")
        if target.endswith(".py") or "/" in target or "\\" in target:
            p = Path(target)
            return (p if p.is_absolute() else base / p).resolve(), attr or None
        return None, attr or None  # a package module: not the user's file to patch
    if ref is None:
        return None, None
    obj = ref if inspect.isfunction(ref) or inspect.isclass(ref) else type(ref)
    try:
        src = inspect.getsourcefile(obj)
    except TypeError:
        src = None
    return (Path(src).resolve() if src else None), getattr(ref, "__name__", None)


def user_code(config) -> UserCode:
    """The files of the config's loss.step and models that lie under its folder."""
    base = Path(config.base_dir).resolve()
    step, name = _ref_file(base, config.loss.step)
    models = tuple(p for p in (_ref_file(base, config.model.critic)[0], _ref_file(base, config.model.generator)[0])
                   if p is not None)

    def ours(p):
        return p is not None and p.suffix == ".py" and p.is_file() and _under(p, base)

    return UserCode(base, step if ours(step) else None, name, tuple(p for p in models if ours(p)))


def _under(p: Path, base: Path) -> bool:
    try:
        p.relative_to(base)
        return True
    except ValueError:
        return False


def _source_line(source: str | None, base: Path) -> tuple[Path | None, int | None]:
    if not source or ":" not in source:
        return None, None
    file, _, line = source.rpartition(":")
    try:
        n = int(line)
    except ValueError:
        return None, None
    p = Path(file)
    return (p if p.is_absolute() else base / p).resolve(), n


# ------------------------------------------------------------------------------------ patches


def _module_site(critic, path: str, files: tuple) -> tuple[str | None, tuple]:
    """(class defined in the user's files, or (line, class) where a library layer is built) for critic.x.y."""
    if critic is None or not path.startswith("critic"):
        return None, ()
    sub = path.split(".", 1)[1] if "." in path else ""
    try:
        m = critic.get_submodule(sub) if sub else critic
    except AttributeError:
        return None, ()
    cls = type(m)
    try:
        src = inspect.getsourcefile(cls)
    except TypeError:
        src = None
    if src and Path(src).resolve() in {Path(f).resolve() for f in files}:
        return cls.__name__, ()
    return None, ()


def build_patch(fix_id: str, code: UserCode, precision: Precision, sources: tuple, module_path: str | None = None,
                critic=None, config=None) -> Patch | None:
    """The fix as a patch of the user's files, or None when nothing in them is in a shape its transform knows."""
    t = TRANSFORMS.get(fix_id)
    if t is None:
        return None
    candidates: list[tuple[Path, int | None]] = []
    for s in sources:
        p, line = _source_line(s, code.base)
        if p is not None and p in code.files() and (p, line) not in candidates:
            candidates.append((p, line))
    pool = {"step": (code.step,) if code.step else (), "models": code.models, "any": code.files()}[t.where]
    if not t.culprit or not candidates:
        candidates += [(p, None) for p in pool if (p, None) not in candidates]
    class_name, built = (None, ())
    if fix_id == "fp32-module" and module_path:
        class_name, built = _module_site(critic, module_path, code.files())
        if class_name is None and config is not None and critic is not None:
            built = _built_at(config, critic, module_path, code)
        if built:
            candidates = [(p, None) for p in pool]
    for path, line in candidates:
        if path not in pool:
            continue
        try:
            before = path.read_text(encoding="utf-8")
            module = cst.parse_module(before)
        except (OSError, UnicodeDecodeError, cst.ParserSyntaxError):
            continue
        func = code.step_name if path == code.step else None
        at = ()
        if built:
            if built[0][0] != path:
                continue
            at = (built[0][1], built[1])
        site = Site(path, path.relative_to(code.base).as_posix(), line, func, precision, class_name, at)
        try:
            out = t.edit(module, site)
        except Exception:  # a shape the transform does not know: no patch rather than a crash
            out = None
        if out is not None and out.code != before:
            overrides = t.overrides_for(precision, config is not None and config.train.grad_scaler)
            return Patch(fix_id, (FilePatch(site.rel, before, out.code),), overrides)
    return None


@contextmanager
def _construction_lines(cls: type, files: set) -> Iterator[dict]:
    """While open, records for each `cls` built the (file, line) of the user's code that built it."""
    lines: dict[int, tuple] = {}
    original = cls.__init__  # type: ignore[misc]  # patches the class's __init__ on purpose

    def init(self, *args, **kwargs):
        f = sys._getframe(1)
        while f is not None and Path(f.f_code.co_filename).resolve() not in files:
            f = f.f_back
        if f is not None and id(self) not in lines:
            lines[id(self)] = (Path(f.f_code.co_filename).resolve(), f.f_lineno)
        original(self, *args, **kwargs)

    cls.__init__ = init  # type: ignore[misc]  # patches the class's __init__ on purpose
    try:
        yield lines
    finally:
        cls.__init__ = original  # type: ignore[misc]  # restores it


def _built_at(config, critic, module_path: str, code: UserCode) -> tuple:
    """((file, line), class name) where the critic's layer at module_path is constructed, by building it again."""
    from nanprobe.io.loading import build_module

    sub = module_path.split(".", 1)[1] if "." in module_path else ""
    try:
        cls = type(critic.get_submodule(sub))
    except AttributeError:
        return ()
    files = set(code.files())
    try:
        with _construction_lines(cls, files) as lines:
            again, _ = build_module(config, config.model.critic, config.model.critic_args, "model.critic")
        hit = lines.get(id(again.get_submodule(sub)))
    except Exception:
        return ()
    return (hit, cls.__name__) if hit else ()


def _sources(run) -> tuple:
    return tuple(f.source for f in (run.first_nonfinite, run.first_issue, run.scale_collapse)
                 if f is not None and f.source)


def attach(config, critic, runs: tuple) -> tuple:
    """The runs with each fix that is local to the user's code carrying its patch (and the snippet in their names)."""
    code = user_code(config)
    if not code.files():
        return runs
    out, cache = [], {}
    for run in runs:
        fixes = []
        for fix in run.fixes:
            if fix.id not in TRANSFORMS:
                fixes.append(fix)
                continue
            module = run.first_issue.module if run.first_issue is not None else None
            key = (fix.id, run.precision, _sources(run), module)
            if key not in cache:
                critic_site = None
                if fix.id == "fp32-module" and module:
                    critic_site = critic
                cache[key] = build_patch(fix.id, code, run.precision, _sources(run), module, critic_site,
                                         config=config)
            patch = cache[key]
            fixes.append(fix if patch is None else replace(fix, patch=patch.diff(),
                                                           snippet=patch.excerpt() or fix.snippet))
        out.append(replace(run, fixes=tuple(fixes)))
    return tuple(out)


def for_fix(config, critic, run, fix_id: str) -> Patch | None:
    """The Patch object behind a fix of a run (what --verify-fix applies)."""
    module = run.first_issue.module if run.first_issue is not None else None
    return build_patch(fix_id, user_code(config), run.precision, _sources(run), module, critic, config=config)


def _diff_files(diff: str) -> set:
    return {line[len("+++ b/"):].rstrip("\n") for line in diff.splitlines() if line.startswith("+++ b/")}


def chosen(runs: tuple) -> str:
    """What `--patch` writes: per failing run (worst first), its best fix that has a patch and was not
    refuted by --verify-fix; a file already changed by an earlier run's choice is not changed twice."""
    out: list[str] = []
    files: set[str] = set()
    seen: set = set()
    for run in sorted(runs, key=lambda r: -r.status.severity):
        fix = next((f for f in run.fixes if f.patch and (f.check is None or f.check.value != "fails")), None)
        if fix is None or fix.patch in seen:
            continue
        touched = _diff_files(fix.patch)
        if touched & files:
            continue
        seen.add(fix.patch)
        files |= touched
        out.append(fix.patch)
    return "".join(out)


def combine(patches: list[Patch]) -> str:
    """One diff for several patches: each file once, with the first patch that changes it."""
    seen, out = set(), []
    for p in patches:
        for f in p.files:
            if f.rel not in seen:
                seen.add(f.rel)
                out.append(_unified(f.rel, f.before, f.after))
    return "".join(out)


# ----------------------------------------------------------------------- replaying patched code


_SKIP_DIRS = {".git", "__pycache__", ".venv", "venv", "env", "node_modules", "site-packages", ".tox", "build", "dist"}
MAX_COPIED = 2000
"""Python files copied from the user's folder for a patched replay (their packages come along; a huge tree does not)."""


def _sources_under(folder: Path) -> list:
    """The folder's Python files, its packages' included, without virtual environments and caches."""
    out = []
    for p in sorted(folder.rglob("*.py")):
        rel = p.relative_to(folder).parts
        if any(part in _SKIP_DIRS or part.startswith(".") for part in rel[:-1]):
            continue
        out.append(p)
        if len(out) >= MAX_COPIED:
            break
    return out


@contextmanager
def patched_code(code: UserCode, patch: Patch) -> Iterator[dict]:
    """Copies of the user's folder's Python files in a temporary folder, with the patch applied there.

    Yields {original path: copy path}. While open, modules the user's files import from their own
    folder are taken from the copies (the originals' entries in sys.modules are set aside, the copies'
    folder is first on sys.path); on exit sys.modules and sys.path are as they were and the folder is gone.
    """
    tmp = Path(tempfile.mkdtemp(prefix="nanprobe-patch-"))
    saved_modules = dict(sys.modules)
    saved_path = list(sys.path)
    try:
        folders = {p.parent for p in code.files()}
        mapping, roots = {}, []
        for folder in folders:
            dest = tmp / folder.relative_to(code.base) if _under(folder, code.base) else tmp / folder.name
            dest.mkdir(parents=True, exist_ok=True)
            roots.append(dest)
            for src in _sources_under(folder):
                target = dest / src.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
                mapping[src.resolve()] = target
        for f in patch.files:
            target = tmp / f.rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f.after, encoding="utf-8")
            mapping[(code.base / f.rel).resolve()] = target
        # The user's neighbours (import models) must come from the copies, not from a cache of the originals.
        for name, mod in list(sys.modules.items()):
            file = getattr(mod, "__file__", None)
            if file and not name.startswith("nanprobe") and any(_under(Path(file).resolve(), f) for f in folders):
                del sys.modules[name]
        for root in sorted(roots, reverse=True):
            sys.path.insert(0, str(root))
        yield mapping
    finally:
        for name in set(sys.modules) - set(saved_modules):
            del sys.modules[name]
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path
        shutil.rmtree(tmp, ignore_errors=True)


def reaches(config, code: UserCode, patch: Patch) -> bool:
    """Whether a replay of the config would import the patched files (they are named by path in it, not
    passed as live objects from Python, which a patch of their source cannot change)."""
    named = set()
    for ref in (config.model.critic, config.model.generator, config.loss.step):
        if isinstance(ref, str):
            p, _ = _ref_file(code.base, ref)
            if p is not None:
                named.add(p)
    files = {(code.base / f.rel).resolve() for f in patch.files}
    # A patched neighbour of a named file is imported by it from the copies' folder.
    return bool(named) and all(f in named or any(f.parent == n.parent for n in named) for f in files)


def patched_config(config, code: UserCode, mapping: dict):
    """The config with loss.step and the models pointing at the patched copies."""
    def moved(ref):
        if not isinstance(ref, str) or ":" not in ref:
            return ref
        p, _ = _ref_file(code.base, ref)
        if p is None or p not in mapping:
            return ref
        return f"{mapping[p]}:{ref.rpartition(':')[2]}"

    model = replace(config.model, critic=moved(config.model.critic), generator=moved(config.model.generator))
    loss = replace(config.loss, step=moved(config.loss.step))
    return replace(config, model=model, loss=loss)
