"""The flight recorder: the live step's first non-finite op, with no replay and no loss function.

A cheap op-level dispatch mode that runs inside the user's own training step. Per floating output
of each computing op it keeps one `aminmax` on the device (its largest |x|: NaN when any element is
NaN, inf when any is inf), and nothing crosses to the host until the step ends, when all of them are
read in the step's one synchronisation. The op tags (module, phase, source line, autograd node) come
from the probe's own tagging (`OpProbe`), so a live finding and a replayed one name ops alike.

Ops run in execution order, so the first op whose output is non-finite made it from inputs that
were finite when produced inside the step: that op is the culprit. Under low-precision autocast,
the first fp32 value that passed the low dtype's largest finite value is named as well (the cast
to fp16 that follows it is where the step would overflow).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from nanprobe.engine import compat, sharding
from nanprobe.engine.probe import OpProbe
from nanprobe.enums import FindingKind, Phase

# Ops whose output holds no computed values, or exactly their input's values (views, fills, copies
# that keep the dtype): their outputs are not measured. Casts that change the dtype are.
_SKIP = frozenset({
    "aten.empty.memory_format", "aten.empty_like.default", "aten.empty_strided.default",
    "aten.new_empty.default", "aten.new_empty_strided.default", "aten.resize_.default",
    "aten.set_.source_Storage_storage_offset", "aten.set_.source_Tensor", "aten.lift_fresh.default",
    "aten.detach.default", "aten.alias.default", "aten.clone.default",
    "aten.zeros_like.default", "aten.zeros.default", "aten.new_zeros.default", "aten.zero_.default",
    "aten.ones_like.default", "aten.ones.default", "aten.new_ones.default",
})
_CASTS = frozenset({"aten._to_copy.default", "aten.copy_.default"})
# Collectives and FSDP's copies around them (all-gather, reduce-scatter) move values between ranks and
# compute none; an async collective's output is still being written when its op returns.
_COMMS = frozenset({"c10d", "_c10d_functional", "_c10d_functional_autograd", "_dtensor", "fsdp"})
# Ops that never make a non-finite value from finite inputs and never grow |x| (so they can be neither
# the first non-finite op nor the first past a dtype's largest value): not measured, which saves a
# read of every activation. The value is the argument that must stay within [-1, 1] (a slope), or None.
_CONTRACTING = {
    "aten.relu.default": None, "aten.relu_.default": None, "aten.threshold_backward.default": None,
    "aten.leaky_relu.default": 1, "aten.leaky_relu_.default": 1, "aten.leaky_relu_backward.default": 2,
    "aten.hardtanh.default": None, "aten.tanh.default": None, "aten.sigmoid.default": None,
    "aten.tanh_backward.default": None, "aten.sigmoid_backward.default": None,
    "aten.neg.default": None, "aten.abs.default": None, "aten.clamp.default": None,
    "aten.clamp_min.default": None, "aten.clamp_max.default": None, "aten.maximum.default": None,
    "aten.minimum.default": None, "aten.where.self": None, "aten.cat.default": None, "aten.stack.default": None,
    "aten.constant_pad_nd.default": None, "aten.max_pool2d_with_indices.default": None,
}
_LEAKY_DEFAULT = 0.01
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LiveOp:
    """An op of the live step, as the flight recorder saw it."""

    index: int
    """Position among the step's measured outputs, in execution order."""
    kind: FindingKind
    """nan, overflow (an infinity, or a value past the low dtype's largest), as the output showed it."""
    phase: Phase
    """forward, input-grad (autograd.grad building a graph), backward, or optimizer."""
    module: str
    """Dotted module path ("critic.head"), the parameter for optimizer ops, "" outside modules."""
    op: str
    """aten overload name, e.g. aten.addmm.default."""
    source: str | None
    """"file:line" in the user's code (for backward ops: of the forward op)."""
    node: str | None
    """Autograd node that ran the op (backward and input-grad ops)."""
    dtype: str
    """Output dtype."""
    shape: tuple
    """Output shape."""
    max_abs: float
    """Largest |x| of the output (nan or inf for a non-finite one)."""

    def describe(self) -> str:
        where = f" in {self.module}" if self.module else ""
        at = f" at {self.source}" if self.source else ""
        node = f" ({self.node})" if self.node else ""
        what = {FindingKind.NAN: "made NaN", FindingKind.OVERFLOW: "made inf"}.get(self.kind, "")
        if self.kind is FindingKind.OVERFLOW and math.isfinite(self.max_abs):
            what = f"passed the low precision's largest value (|x| up to {self.max_abs:.4g})"
        return (f"{self.op}{node}{where} ({self.phase.value}){at} {what} in {self.dtype} {list(self.shape)}"
                f"{' from finite inputs' if not math.isfinite(self.max_abs) else ''}")

    def to_dict(self) -> dict:
        return {"index": self.index, "kind": self.kind.value, "phase": self.phase.value, "module": self.module,
                "op": self.op, "source": self.source, "node": self.node, "dtype": self.dtype,
                "shape": list(self.shape), "max_abs": self.max_abs}


@dataclass(frozen=True)
class Flight:
    """What the recorder read at the end of a step."""

    ops: int
    """Outputs measured in the step."""
    first_nonfinite: LiveOp | None
    """The first op whose output was NaN or inf (its inputs from inside the step were finite)."""
    first_past_max: LiveOp | None
    """Under fp16/bf16 autocast: the first fp32 output past that dtype's largest finite value."""


def tag_hash(module: str, op: str) -> int:
    """A 24-bit id of an op's tags (exact in a float32), so ranks can tell whether they saw the same op."""
    return zlib.crc32(f"{module}|{op}".encode()) & 0xFFFFFF


class FlightRecorder(OpProbe):
    """Records, per op output of the live step, its largest |x| on the device; `read` once per step."""

    def __init__(self, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None = None,
                 base_dir: str | None = None):
        super().__init__(modules, base_dir=base_dir)
        self.optimizer = optimizer
        self._tags: list[tuple] = []
        self._by_dtype: dict[torch.dtype, tuple[list, list]] = {}
        self._order: list[tuple[torch.dtype, int]] = []
        self._opt_hooks: list = []

    # The training loop sets no phase: the optimizer's step hooks do, and the autograd engine tells
    # a graph-building autograd.grad (the gradient penalty) from the loss's backward by grad mode.
    def _node_phase(self) -> Phase:
        if self.phase is Phase.OPTIMIZER:
            return Phase.OPTIMIZER
        return Phase.INPUT_GRAD if torch.is_grad_enabled() else Phase.BACKWARD

    def __enter__(self) -> FlightRecorder:
        if self.optimizer is not None:
            named = {}
            for root, model in self.modules.items():
                named.update({compat.user_path(f"{root}.{n}"): p for n, p in model.named_parameters()})
            self.name_params(named, self.optimizer)  # type: ignore[arg-type]  # Parameters are Tensors; only read
            self._opt_hooks = [self.optimizer.register_step_pre_hook(self._optimizer_begins),
                               self.optimizer.register_step_post_hook(self._optimizer_ends)]
        try:
            return super().__enter__()  # type: ignore[return-value]  # OpProbe.__enter__ returns self
        except BaseException:
            self._remove_opt_hooks()
            raise

    def __exit__(self, *exc) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._remove_opt_hooks()

    def _remove_opt_hooks(self) -> None:
        for h in self._opt_hooks:
            h.remove()
        self._opt_hooks = []

    def _optimizer_begins(self, optimizer, args, kwargs):
        self.phase = Phase.OPTIMIZER
        # A closure (Lightning's automatic optimization, LBFGS) runs the forward and backward inside
        # step(): those ops keep their own phases, and the update after it is the optimizer's.
        # args holds the optimizer itself first, then step()'s own arguments.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if not callable(closure):
            return None

        def phased():
            self.phase = Phase.FORWARD
            try:
                return closure()
            finally:
                self.phase = Phase.OPTIMIZER

        if "closure" in kwargs:
            return args, {**kwargs, "closure": phased}
        return (args[0], phased, *args[2:]), kwargs

    def _optimizer_ends(self, *args) -> None:
        self.phase = Phase.FORWARD

    def _record(self, func, args, kwargs, out) -> None:
        name = str(func)
        phase, module, source, node = self._tag(name)
        if func.is_view or name in _SKIP or func.namespace in _COMMS:
            return
        if name in _CONTRACTING:
            where = _CONTRACTING[name]
            slope = args[where] if where is not None and len(args) > where else _LEAKY_DEFAULT
            if where is None or (isinstance(slope, (int, float)) and abs(slope) <= 1):
                return
        if isinstance(out, torch.Tensor):
            outs = [out]
        elif isinstance(out, (list, tuple)) and out:
            outs = [t for t in out if isinstance(t, torch.Tensor)]
        # in-place foreach ops return nothing: their first argument changed
        elif args and compat.op_schema(func).is_mutable:
            first = args[0]
            outs = [first] if isinstance(first, torch.Tensor) else [t for t in first if isinstance(t, torch.Tensor)]
        else:
            return
        if name in _CASTS:
            src = args[1] if name == "aten.copy_.default" and len(args) > 1 else (args[0] if args else None)
            if isinstance(src, torch.Tensor) and (src.dtype == outs[0].dtype or (
                    src.is_floating_point() and outs[0].is_floating_point()
                    and torch.finfo(outs[0].dtype).max >= torch.finfo(src.dtype).max)):
                return  # the same values, or a cast to a dtype that holds them all: nothing new to see
        if phase is Phase.OPTIMIZER:
            for t in (args[0] if args and isinstance(args[0], (list, tuple)) else args):
                if isinstance(t, torch.Tensor):
                    param = self._param_of.get(t)
                    if param is not None:
                        module = param
                        break
        for t in outs:
            # Under FSDP2 the optimizer updates DTensors: this rank's shard is measured, with no collective.
            t = sharding.local(t)
            if t.dtype not in _FLOATS or t.numel() == 0:
                continue
            mn, mx = torch.aminmax(t.detach())
            mins, maxs = self._by_dtype.setdefault(t.dtype, ([], []))
            self._order.append((t.dtype, len(maxs)))
            mins.append(mn)
            maxs.append(mx)
            self._tags.append((phase, module, name, source, node, t.dtype, tuple(t.shape)))

    # -- the step's one read

    def values(self) -> torch.Tensor | None:
        """Largest |x| per measured output, in execution order, as one float64 tensor on the device."""
        if not self._order:
            return None
        offsets, parts, start = {}, [], 0
        for dtype, (mins, maxs) in self._by_dtype.items():
            offsets[dtype] = start
            parts.append(torch.maximum(torch.stack(maxs), torch.stack(mins).neg()).double())
            start += len(maxs)
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        if len(parts) == 1:
            return flat
        order = torch.tensor([offsets[d] + i for d, i in self._order], device=flat.device)
        return flat[order]

    def first_bad(self, values: torch.Tensor | None) -> torch.Tensor:
        """[index of the first non-finite output or -1, its tag hash], computed on the device (no sync)."""
        if values is None:
            return torch.tensor([-1.0, 0.0], dtype=torch.float64)
        bad = ~torch.isfinite(values)
        idx = bad.to(torch.int8).argmax()
        hashes = torch.tensor([tag_hash(t[1], t[2]) for t in self._tags], dtype=torch.float64, device=values.device)
        return torch.where(bad.any(), torch.stack([idx.double(), hashes[idx]]),
                           torch.tensor([-1.0, 0.0], dtype=torch.float64, device=values.device))

    def op(self, index: int, kind: FindingKind, max_abs: float) -> LiveOp:
        phase, module, name, source, node, dtype, shape = self._tags[index]
        return LiveOp(index, kind, phase, module, name, source, node, str(dtype).replace("torch.", ""), shape, max_abs)

    def describe_at(self, index: int, hashed: int) -> str | None:
        """This rank's op at a position another rank reported, when its tags hash alike (same program)."""
        if not 0 <= index < len(self._tags):
            return None
        phase, module, name, source, node = self._tags[index][:5]
        if tag_hash(module, name) != hashed:
            return None
        return f"{name}{f' in {module}' if module else ''} ({phase.value}){f' at {source}' if source else ''}"

    def find(self, host: list[float], low: torch.dtype | None) -> Flight:
        """The findings from the values read to the host (`values().tolist()`)."""
        first = past = None
        limit = torch.finfo(low).max if low is not None else math.inf
        for i, v in enumerate(host):
            if not math.isfinite(v):
                first = self.op(i, FindingKind.NAN if math.isnan(v) else FindingKind.OVERFLOW, v)
                break
            tags = self._tags[i]
            # Only values the models computed in fp32 (not the loss scale, a sum over the batch, ...).
            if past is None and v > limit and tags[5] == torch.float32 and tags[1] and tags[0] is not Phase.OPTIMIZER:
                past = self.op(i, FindingKind.OVERFLOW, v)
        return Flight(len(host), first, past)

    def reset(self) -> None:
        """Forget the step's ops (the hooks and the mode stay)."""
        self._tags, self._by_dtype, self._order = [], {}, []
        self._by_seq.clear()
        self._node_tags.clear()
        self._stack.clear()
        self.phase = Phase.FORWARD
