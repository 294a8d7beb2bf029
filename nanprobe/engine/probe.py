"""The op-level probe: every floating-point aten op, tagged with module, phase, step and source line.

`OpProbe` is the public context manager; `_ProbeMode` is the private TorchDispatchMode behind it
(the same split as torch.utils.flop_counter.FlopCounterMode). Backward ops are attributed to the
forward op that created their autograd node: nodes are matched to the op dispatched right after
the node's sequence number was taken, so double-backward nodes made inside `autograd.grad` carry
the module and line of the forward op they differentiate.
"""
from __future__ import annotations

import math
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from nanprobe.engine import compat
from nanprobe.engine import stats as st
from nanprobe.engine.compat import TorchDispatchMode
from nanprobe.enums import Phase

# Ops whose output holds no computed values: uninitialised memory or pure metadata.
_NO_VALUES = frozenset({
    "aten.empty.memory_format", "aten.empty_like.default", "aten.empty_strided.default",
    "aten.new_empty.default", "aten.new_empty_strided.default", "aten.resize_.default",
    "aten.set_.source_Storage_storage_offset", "aten.set_.source_Tensor", "aten.lift_fresh.default",
    "aten.detach.default", "aten.alias.default", "aten._to_copy_noop",
})
# Ops that fill their output with one value: where the value sits in the arguments (None: fixed value).
_CONSTANT = {
    "aten.zeros_like.default": 0.0, "aten.zeros.default": 0.0, "aten.new_zeros.default": 0.0,
    "aten.zero_.default": 0.0, "aten.ones_like.default": 1.0, "aten.ones.default": 1.0,
    "aten.new_ones.default": 1.0, "aten.full.default": 1, "aten.full_like.default": 1,
    "aten.fill_.Scalar": 1, "aten.new_full.default": 2,
}
# Ops whose output holds their (first) input's values when the dtype is kept: the row is copied, not measured.
_COPIES = frozenset({"aten.clone.default", "aten._to_copy.default", "aten.copy_.default"})


@dataclass(slots=True)
class OpEvent:
    """One recorded op (internal and mutable; the report copies what it needs)."""

    index: int
    """Position in execution order within the replay."""
    step: int
    """Critic step."""
    attempt: int
    """Attempt within the step (a step GradScaler skips is retried at the lower scale)."""
    phase: Phase
    """Phase the op ran in."""
    module: str
    """Dotted module path, "" outside modules."""
    op: str
    """aten overload name, e.g. aten.convolution.default."""
    source: str | None
    """"file:line" in the user's code (for backward ops: of the forward op)."""
    node: str | None
    """Autograd node that ran this op (backward ops only)."""
    dtype: str
    """Output dtype."""
    shape: tuple
    """Shape of the first output."""
    producers: tuple
    """Indices of the recorded ops that produced this op's inputs."""
    param: str | None = None
    """Parameter being updated (optimizer ops)."""
    row: list | None = None
    """Statistics row (see nanprobe.engine.stats), filled when the step's rows are fetched."""
    skipped: bool = False
    """True when the attempt was skipped by dynamic loss scaling and retried."""
    info: dict | None = None
    """Extra facts for the report (e.g. which samples of the batch are bad)."""
    scalars: tuple = ()
    """Python float arguments of the op (an eps added, a power, an addcdiv_ value), as the user passed them."""

    @property
    def has_nan(self) -> bool:
        return self.row[st.NAN] > 0  # type: ignore[index]  # rows are fetched before analysis

    @property
    def has_inf(self) -> bool:
        return self.row[st.POSINF] + self.row[st.NEGINF] > 0  # type: ignore[index]  # rows are fetched before analysis


def _norm_name(name: str) -> str:
    return name.replace("_", "").lower()


_NODE_SUFFIX = re.compile(r"backward\d*$")


def _node_matches(node_name: str, op: str) -> bool:
    base = _NODE_SUFFIX.sub("", node_name.rsplit("::", 1)[-1].lower())
    op_base = _norm_name(op.split(".")[1] if op.count(".") >= 2 else op)
    return base == op_base or base.startswith(op_base) or op_base.startswith(base)


class _SourceFinder:
    """Finds the innermost frame in the user's files (or nanprobe's built-in losses)."""

    def __init__(self, base_dir: str | None, library_dirs: tuple = ()):
        import nanprobe

        pkg = os.path.dirname(nanprobe.__file__)
        self._skip = tuple(os.path.normcase(p) + os.sep for p in {
            os.path.dirname(torch.__file__), pkg, sysconfig.get_paths()["stdlib"],
            sysconfig.get_paths()["platstdlib"], *library_dirs,
        } if p)
        self._allowed = os.path.normcase(os.path.join(pkg, "engine", "losses.py"))
        self._base = base_dir
        self._cache: dict[str, bool] = {}
        self._shown: dict[str, str] = {}

    def _is_user(self, filename: str) -> bool:
        hit = self._cache.get(filename)
        if hit is None:
            norm = os.path.normcase(os.path.abspath(filename))
            hit = not filename.startswith("<") and (norm == self._allowed or not norm.startswith(self._skip))
            self._cache[filename] = hit
        return hit

    def find(self, depth: int = 2) -> str | None:
        f: FrameType | None = sys._getframe(depth)
        while f is not None:
            name = f.f_code.co_filename
            if self._is_user(name):
                return f"{self.show(name)}:{f.f_lineno}"
            f = f.f_back
        return None

    def show(self, filename: str) -> str:
        """The file as findings name it: relative to the config's folder when inside it (cached: ops ask per op)."""
        shown = self._shown.get(filename)
        if shown is None:
            shown = self._shown[filename] = self._show(filename)
        return shown

    def _show(self, filename: str) -> str:
        if self._base:
            try:
                rel = os.path.relpath(filename, self._base)
                if not rel.startswith(".."):
                    return rel
            except ValueError:
                pass
        if os.path.normcase(filename) == self._allowed:
            return "nanprobe/engine/losses.py"
        return filename


def user_source(tb, base_dir: str | None, files: tuple = ()) -> str | None:
    """file:line of the innermost frame of a traceback in the user's code: the files the config names
    first, then any file outside torch, nanprobe and the standard library; shown as findings show it."""
    finder = _SourceFinder(base_dir)
    frames = []
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    named = {os.path.normcase(os.path.abspath(str(f))) for f in files}
    for pick in (lambda name: os.path.normcase(os.path.abspath(name)) in named, finder._is_user):
        for name, line in reversed(frames):
            if not name.startswith("<") and pick(name):
                return f"{finder.show(name)}:{line}"
    return None


class _ProbeMode(TorchDispatchMode):
    def __init__(self, probe: OpProbe):
        super().__init__()
        self.probe = probe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        probe = self.probe
        if not probe._paused:
            # The probe's own statistics and samples are exact in any dtype: they must not pay for (or be seen
            # by) the modes below it, such as the emulated kernels, which would upcast and round every abs and
            # comparison.
            with compat.no_dispatch_modes():
                probe._record(func, args, kwargs, out)
        return out


def _torch_names(root: str, model: torch.nn.Module) -> list:
    # FSDP1 and checkpoint wrappers sit between a module and its children: paths read as the user wrote them.
    return [(compat.user_path(f"{root}.{n}") if n else root, m) for n, m in model.named_modules()]


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            for w in v:
                if isinstance(w, torch.Tensor):
                    yield w


@dataclass
class _StepBuffer:
    """Device-side rows waiting for the step's one host transfer."""

    pending_idx: list = field(default_factory=list)
    pending_rows: list = field(default_factory=list)
    position: dict = field(default_factory=dict)

    def add(self, idx: int, row: torch.Tensor) -> None:
        self.position[idx] = len(self.pending_rows)
        self.pending_idx.append(idx)
        self.pending_rows.append(row)

    def pending(self, idx: int) -> torch.Tensor | None:
        pos = self.position.get(idx)
        return None if pos is None else self.pending_rows[pos]


class OpProbe:
    """Records statistics of every floating-point aten op run inside it; hooks and mode removed on exit.

    `phase`, `step` and `attempt` are set by the caller as the replay moves on; ops run inside
    `torch.autograd.grad` during the forward phase are tagged `input-grad` automatically.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], base_dir: str | None = None, on_device: bool | None = None,
                 on_record: Callable[[OpEvent, list[torch.Tensor]], None] | None = None,
                 named: Callable | None = None, layer_sources: dict[str, str] | None = None,
                 library_dirs: tuple = ()):
        self.modules = modules
        self._named = named or _torch_names
        """named(root, model) -> (path, module) pairs: dotted torch paths, or Keras layer paths."""
        self._layer_sources = layer_sources or {}
        """Module path -> "file:line" of the user's code that built it (Keras layers), for ops run in library code."""
        self._entry: list = []
        self.on_record = on_record
        """Called with each recorded event and its floating outputs once their statistics are taken."""
        self.events: list[OpEvent] = []
        self.phase = Phase.FORWARD
        self.step = 0
        self.attempt = 0
        self._paused = False
        self._on_device = on_device
        self._stack: list[str] = []
        self._hooks: list = []
        self._mode: _ProbeMode | None = None
        self._producer = WeakTensorKeyDictionary()
        self._by_seq: dict[int, tuple] = {}
        self._node_tags: dict[int, tuple] = {}
        # Keyed by the tensor itself (weakly), not id(): an optimizer temporary's id is reused by a later
        # tensor once it is freed, which would name the wrong parameter.
        self._param_of = WeakTensorKeyDictionary()
        self._params = WeakTensorKeyDictionary()
        self._writes: dict[str, int] = {}
        self.sources = _SourceFinder(base_dir, library_dirs)
        self._buf = _StepBuffer()
        self._scratch: st.Scratch | None = None
        self._merged: set[int] = set()
        """Ops whose row is of several outputs (batch norm's output and its statistics)."""
        self._train_modes: dict[torch.nn.Module, bool] = {}

    # -- context manager
    def __enter__(self) -> OpProbe:
        try:
            for root, model in self.modules.items():
                self._train_modes.update({m: m.training for m in model.modules()})
                for path, mod in self._named(root, model):
                    self._hooks.append(mod.register_forward_pre_hook(self._push(path)))
                    self._hooks.append(mod.register_forward_hook(self._pop, always_call=True))
            self._scratch = st.Scratch()
            self._mode = _ProbeMode(self)
            self._mode.__enter__()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._mode is not None:
                self._mode.__exit__(*exc)
                self._mode = None
        finally:
            self._remove()

    def _remove(self) -> None:
        self._scratch = None
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for m, training in self._train_modes.items():
            m.train(training)
        self._train_modes.clear()

    def _push(self, path: str):
        def hook(module, inputs):
            self._stack.append(path)
            # Where the user's code called this layer: an op whose innermost user frame is still that one ran
            # in library code, and the line that built the layer says more.
            self._entry.append(self.sources.find() if path in self._layer_sources else None)

        return hook

    def _pop(self, module, inputs, output):
        if self._stack:
            self._stack.pop()
            self._entry.pop()

    def _source(self, module: str) -> str | None:
        found = self.sources.find(3)
        if self._entry and self._entry[-1] is not None and found == self._entry[-1]:
            built = self._layer_sources.get(module)
            if built is not None:
                return self.sources.show(built.rsplit(":", 1)[0]) + ":" + built.rsplit(":", 1)[1]
        return found

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Ops run inside are not recorded (nanprobe's own measurements)."""
        was, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = was

    def name_params(self, named: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Lets optimizer ops name the parameter they update (params, grads and optimizer state)."""
        self._param_of.clear()
        self._writes = {}
        self._params = WeakTensorKeyDictionary((p, n) for n, p in named.items())
        for name, p in named.items():
            self._param_of[p] = name
            if p.grad is not None:
                self._param_of[p.grad] = name
            if optimizer is not None:
                for v in optimizer.state.get(p, {}).values():
                    if isinstance(v, torch.Tensor):
                        self._param_of[v] = name

    # -- recording
    def observe(self, tensor: torch.Tensor, op: str, module: str = "", source: str | None = None,
                info: dict | None = None) -> None:
        """Record an external tensor (e.g. the data batch as loaded) as an op with no inputs."""
        idx = len(self.events)
        self.events.append(OpEvent(idx, self.step, self.attempt, self.phase, module, op, source, None,
                                   str(tensor.dtype).replace("torch.", ""), tuple(tensor.shape), (), info=info))
        with self.paused():  # called from outside the mode: nanprobe's own ops must not be recorded
            self._stat(idx, [tensor])
            if self.on_record is not None:
                self.on_record(self.events[idx], [tensor])
        self._producer[tensor] = idx

    def _tag_of_node(self, node) -> tuple:
        seq = node._sequence_nr()
        tag = self._node_tags.get(seq)
        if tag is None:
            hit = self._by_seq.get(seq + 1)
            name = node.name()
            if hit is not None and _node_matches(name, hit[2]):
                tag = (hit[0], hit[1], name)
            else:
                tag = ("", None, name)
            self._node_tags[seq] = tag
        return tag

    def _node_phase(self) -> Phase:
        """The phase of an op the autograd engine runs (the caller sets `phase` for the rest)."""
        return Phase.INPUT_GRAD if self.phase is Phase.FORWARD else self.phase

    def _tag(self, name: str) -> tuple:
        """(phase, module, source, autograd node) of the op being dispatched; every op must pass here,
        so that the autograd nodes it creates find their forward op."""
        node = compat.current_autograd_node()
        if node is None:
            phase = self.phase
            module = self._stack[-1] if self._stack else ""
            source = self._source(module) if phase is not Phase.OPTIMIZER else None
            node_name = None
        else:
            phase = self._node_phase()
            module, source, node_name = self._tag_of_node(node)
        self._by_seq.setdefault(compat.autograd_sequence_nr(), (module, source, name))
        return phase, module, source, node_name

    def _record(self, func, args, kwargs, out) -> None:
        name = str(func)
        phase, module, source, node_name = self._tag(name)
        inputs = list(_tensors(args))
        if kwargs:
            inputs.extend(_tensors(kwargs.values()))
        producer = self._producer
        if func.is_view or name in _NO_VALUES:
            # Views carry their base's values: keep the data-flow link, record nothing.
            if inputs and isinstance(out, torch.Tensor):
                src = producer.get(inputs[0])
                if src is not None:
                    producer[out] = src
            return
        outs = [out] if isinstance(out, torch.Tensor) else list(_tensors(out if isinstance(out, (list, tuple)) else ()))
        outs = [t for t in outs if st.is_float(t)]
        if not outs:
            return
        param = None
        if phase is Phase.OPTIMIZER:
            for t in inputs:
                param = self._param_of.get(t)
                if param is not None:
                    module = param[:max(param.rfind("."), param.rfind("/"))]  # critic.net.0.weight, critic/conv/kernel
                    break
        elif name == "aten._to_copy.default" and inputs and inputs[0] in self._params:
            param = self._param_of.get(inputs[0])  # autocast casting a weight
        prods = []
        for t in inputs:
            p = producer.get(t)
            if p is not None and p not in prods:
                prods.append(p)
        idx = len(self.events)
        scalars = tuple(v for v in args if type(v) is float)
        if kwargs:
            scalars += tuple(v for v in kwargs.values() if type(v) is float)
        self.events.append(OpEvent(idx, self.step, self.attempt, phase, module, name, source, node_name,
                                   str(outs[0].dtype).replace("torch.", ""), tuple(outs[0].shape), tuple(prods), param,
                                   scalars=scalars))
        if not self._known_row(idx, name, args, inputs, outs):
            self._stat(idx, outs)
        if self.on_record is not None:
            self.on_record(self.events[idx], outs)
        for t in outs:
            producer[t] = idx
            if param is not None and phase is Phase.OPTIMIZER:
                self._param_of[t] = param
                if t in self._params:
                    self._writes[param] = idx  # an in-place op on the parameter itself

    def producer(self, tensor: torch.Tensor) -> int | None:
        """Index of the recorded op that produced `tensor` (views and detached copies included), or None."""
        return self._producer.get(tensor)

    def param_writes(self) -> dict[str, int]:
        """Parameter name -> index of the last optimizer op that wrote it, since `name_params`."""
        return dict(self._writes)

    def _known_row(self, idx: int, name: str, args, inputs: list, outs: list) -> bool:
        """Fill the row without reading the output when the op's values are known: a fill or a copy."""
        if len(outs) != 1:
            return False
        out = outs[0]
        where = _CONSTANT.get(name)
        if where is not None:
            value = where if isinstance(where, float) else (args[where] if len(args) > where else None)
            if not isinstance(value, (int, float)):
                return False
            # The value as the output dtype holds it: 1e5 is inf in fp16, 1e-8 is 0.
            value = torch.tensor(value, dtype=out.dtype).item() if out.dtype != torch.float64 else float(value)
            row = st.constant_row(value, out.numel(), out.dtype)
            if self._on_device_for(out):
                self._buf.add(idx, torch.tensor(row, dtype=torch.float64, device=out.device))
            else:
                self.events[idx].row = row
            return True
        if name in _COPIES:
            src_t = inputs[-1] if name == "aten.copy_.default" else (inputs[0] if inputs else None)
            if src_t is None or src_t.numel() != out.numel():
                return False
            src = self._producer.get(src_t)
            if src is None:
                return False
            row = self.events[src].row if self.events[src].row is not None else self._buf.pending(src)  # type: ignore[assignment]  # a list or a pending tensor row, None checked below
            if row is None:
                return False
            # The producer's row is of its whole output: a view that leaves some of it out (a slice) or
            # repeats some (an expand) holds other values.
            if src in self._merged or math.prod(self.events[src].shape) != out.numel() or not st.dense(src_t):
                return False
            if isinstance(row, list):
                # A cast whose row follows from its input's: a widening one, or a narrowing one that neither
                # overflows nor reaches the subnormal range (autocast's casts to fp16/bf16, mostly).
                cast = st.cast_row(row, src_t.dtype, out.dtype)
                if cast is None:
                    return False
                self.events[idx].row = cast
            elif src_t.dtype == out.dtype:
                self._buf.add(idx, row)
            else:
                return False
            return True
        return False

    def _on_device_for(self, t: torch.Tensor) -> bool:
        return self._on_device if self._on_device is not None else t.device.type != "cpu"

    def _stat(self, idx: int, outs: list) -> None:
        if len(outs) > 1:
            self._merged.add(idx)
        if self._on_device_for(outs[0]):
            rows = [st.device_row(t) for t in outs]
            self._buf.add(idx, rows[0] if len(rows) == 1 else _merge_device(rows))
        else:
            self.events[idx].row = st.merge([st.host_row(t, self._scratch) for t in outs])

    def fetch(self) -> None:
        """Bring the step's device-side rows to the host in one transfer."""
        buf = self._buf
        if buf.pending_rows:
            rows = torch.stack(buf.pending_rows).cpu().tolist()
            for i, row in zip(buf.pending_idx, rows):
                self.events[i].row = row
        self._buf = _StepBuffer()

    def skip_attempt(self, step: int, attempt: int) -> None:
        """Mark an attempt's ops as skipped (GradScaler skipped the step and it is retried)."""
        for e in reversed(self.events):
            if e.step != step or e.attempt != attempt:
                if e.step < step:
                    break
                continue
            e.skipped = True


def _merge_device(rows: list) -> torch.Tensor:
    stacked = torch.stack(rows)
    merged = stacked.sum(0)
    merged[st.MAX_ABS] = stacked[:, st.MAX_ABS].max()
    merged[st.MIN_NONZERO] = stacked[:, st.MIN_NONZERO].min()
    return merged
