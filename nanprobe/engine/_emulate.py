"""Emulated fp16/bf16 kernels for CPU replays (`precision.kernels: emulated`).

A GPU computes most half-precision work in fp32 and rounds the result: CUDA's elementwise kernels
for fp16/bf16 load each value, compute in fp32 ("opmath") and round each output; cuBLAS and cuDNN
accumulate fp16/bf16 products in fp32 and round once; reductions accumulate in fp32. The CPU's own
fp16/bf16 kernels are about 20 times slower than fp32 ones. `emulated_kernels()` is a
TorchDispatchMode that runs each op whose floating inputs include fp16/bf16 on fp32 copies of them
and rounds each floating output to the dtype the op would have produced natively, which is both
faster and closer to the GPU than the CPU's own low-precision kernels.

- The output dtype comes from the op's meta kernel (type promotion, an explicit `dtype=`, ops that
  return fp32 statistics from fp16 inputs), asked once per op and input signature; integer and
  bool outputs are left as they are.
- In-place and out= ops (every argument the schema marks as written, foreach and fused optimizer
  lists included) write the rounded result back into the low-precision tensor, so dtype and
  storage stay the caller's.
- View and metadata ops, copies and casts (`_to_copy`, `copy_`, `clone`, `cat`, ...) run natively:
  they do no arithmetic, a view stays a view, and a cast rounds to nearest even with subnormals,
  as on the GPU.
- Random ops run natively, so they draw exactly the numbers the native kernels draw (a GPU's
  generator draws other numbers anyway). `native_dropout` draws its mask natively and applies it
  in fp32 with one rounding, as CUDA's fused dropout kernel does. On the CPU `F.dropout` never
  reaches it: it decomposes above the dispatcher into `bernoulli_`, `div_` and `mul`, so its scale
  1/(1-p) is rounded to fp16/bf16 before the multiply, as the CPU's native kernels do too (an ulp
  from CUDA's single rounding, on some elements).

It is a dispatch mode, so it sits below autocast and autograd: autocast still decides each op's
dtype (`precision.policy`), the backward and double backward dispatch through it like the forward,
and so does the optimizer step. Enter it before (under) the probe's mode: modes stack, the probe's
call to an op reaches this mode, and the probe records the rounded low-precision outputs.

Known differences from a GPU, all below one rounding of the output: cuBLAS may use reduced-precision
split-K reductions for fp16/bf16 (`allow_fp16_reduced_precision_reduction`); CUDA math functions
(expf, logf, powf) and oneDNN/MKL fp32 kernels differ by an fp32 ulp or so before the rounding; a
CUDA kernel that fuses several ops (fused Adam, fused dropout) rounds once where a sequence of aten
ops rounds after each, and the CPU replay runs the aten ops the CPU dispatches (e.g. cuDNN's fused
batch-norm backward against the CPU's).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from nanprobe.engine.compat import DispatchKey, DispatchKeySet, TorchDispatchMode, exclude_dispatch_keys, op_schema

LOW = frozenset({torch.float16, torch.bfloat16})
_FLOATING = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

# Ops that do no arithmetic on their values (or only a cast, which rounds as the GPU does): run natively.
_NATIVE = frozenset({
    "_to_copy", "copy_", "clone", "cat", "stack", "detach", "detach_", "alias", "_unsafe_view", "lift_fresh",
    "lift_fresh_copy", "empty_like", "zeros_like", "ones_like", "full_like", "new_empty", "new_empty_strided",
    "new_zeros", "new_ones", "new_full", "zero_", "fill_", "resize_", "resize_as_", "set_", "_local_scalar_dense",
    "index_select", "gather", "index", "constant_pad_nd", "flip", "roll", "repeat", "masked_fill", "masked_fill_",
    "_copy_from", "_copy_from_and_resize", "is_nonzero", "equal", "_has_compatible_shallow_copy_type",
})


def _is_random(func) -> bool:
    return torch.Tag.nondeterministic_seeded in func.tags


class _Plan:
    """What one op overload needs: run it natively, or which arguments it writes."""

    __slots__ = ("native", "written")

    def __init__(self, func):
        schema = op_schema(func)
        # (position, keyword name) of each argument the op writes to
        self.written = tuple((i, a.name) for i, a in enumerate(schema.arguments)
                             if a.alias_info is not None and a.alias_info.is_write)
        returns_alias = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        computes = any("Tensor" in str(r.type) for r in schema.returns) or bool(self.written)
        self.native = (func.is_view or returns_alias or not computes or _is_random(func)
                       or func.overloadpacket.__name__ in _NATIVE)


_plans: dict = {}
_out_dtypes: dict = {}
fallbacks: set[str] = set()
"""Ops whose output dtype the meta kernel could not give (the dtype rule of `_rule_dtype` was used)."""


def _plan(func) -> _Plan:
    plan = _plans.get(func)
    if plan is None:
        plan = _plans[func] = _Plan(func)
    return plan


def _has_low(values) -> bool:
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.dtype in LOW:
                return True
        elif isinstance(v, (list, tuple)):
            for w in v:
                if isinstance(w, torch.Tensor) and w.dtype in LOW:
                    return True
    return False


def _sig(v):
    if isinstance(v, torch.Tensor):
        return (v.dtype, v.dim() == 0)  # 0-dim tensors take part in type promotion like scalars
    if isinstance(v, (list, tuple)):
        return tuple(_sig(w) for w in v)
    if isinstance(v, (torch.dtype, bool, str)):
        # flags choose which outputs exist (convolution_backward's output_mask), so they key by value
        return (type(v), v)
    return type(v)


def _meta(v):
    if isinstance(v, torch.Tensor):
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
    if isinstance(v, (list, tuple)):
        return type(v)(_meta(w) for w in v)
    if isinstance(v, torch.device):
        return torch.device("meta")
    return v


def _flat_tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat_tensors(v)]
    return [None]  # keeps positions of non-tensor outputs (None, scalars) aligned


def _rule_dtype(args, kwargs):
    """Without a meta kernel: the low dtype when every floating input with dimensions is low, else None."""
    seen = set()
    for v in (*args, *kwargs.values()):
        for t in (v if isinstance(v, (list, tuple)) else (v,)):
            if isinstance(t, torch.Tensor) and t.dtype in _FLOATING and t.dim() > 0:
                seen.add(t.dtype)
    return next(iter(seen)) if len(seen) == 1 and seen <= LOW else None


def _target_dtypes(func, args, kwargs) -> tuple:
    """Dtypes of the op's outputs (flattened) as the native kernels give them, or None each where unknown."""
    key = (func, tuple(_sig(a) for a in args), tuple((k, _sig(v)) for k, v in kwargs.items()))
    hit = _out_dtypes.get(key)
    if hit is None:
        try:
            out = func(*[_meta(a) for a in args], **{k: _meta(v) for k, v in kwargs.items()})
            hit = tuple(None if t is None else t.dtype for t in _flat_tensors(out))
        except Exception:  # no meta kernel, or one that needs real data
            fallbacks.add(str(func))
            hit = (_rule_dtype(args, kwargs),)
        _out_dtypes[key] = hit
    return hit


def _up(v, copies: dict):
    if isinstance(v, torch.Tensor):
        if v.dtype in LOW:
            c = v.float()
            copies[id(c)] = v
            return c
        return v
    if isinstance(v, (list, tuple)) and v and any(isinstance(w, torch.Tensor) for w in v):
        return type(v)(_up(w, copies) for w in v)
    return v


def _write_back(orig, copy) -> None:
    if isinstance(orig, torch.Tensor):
        if copy is not orig and orig.dtype in LOW:
            if orig.shape != copy.shape:
                orig.resize_(copy.shape)  # an out= tensor the op resized
            orig.copy_(copy)
    elif isinstance(orig, (list, tuple)):
        for o, c in zip(orig, copy):
            _write_back(o, c)


class _Rounder:
    def __init__(self, dtypes: tuple, copies: dict):
        self.dtypes, self.copies, self.i = dtypes, copies, 0

    def __call__(self, out):
        if isinstance(out, torch.Tensor):
            i, self.i = self.i, self.i + 1
            orig = self.copies.get(id(out))
            if orig is not None:
                return orig  # an in-place or out= result: the caller's tensor, already written back
            to = self.dtypes[i] if i < len(self.dtypes) else self.dtypes[-1]
            if to is not None and to is not out.dtype and out.dtype in _FLOATING and to in _FLOATING:
                return out.to(to)
            return out
        if isinstance(out, (list, tuple)):
            return type(out)(self(v) for v in out)
        self.i += 1
        return out


_NO_AUTOCAST = DispatchKeySet(DispatchKey.AutocastCPU) | DispatchKeySet(DispatchKey.AutocastCUDA)


def _dropout(func, args, kwargs):
    """native_dropout: the mask drawn natively, applied in fp32 with one rounding (as CUDA's fused kernel)."""
    out, mask = func(*args, **kwargs)
    x = args[0]
    p = args[1] if len(args) > 1 else kwargs.get("p")
    train = args[2] if len(args) > 2 else kwargs.get("train")
    if train is False or not p or p >= 1:
        return out, mask
    return (x.float() * mask * (1.0 / (1.0 - p))).to(x.dtype), mask


class _EmulateMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        kwargs = kwargs or {}
        plan = _plan(func)
        if plan.native or not (_has_low(args) or _has_low(kwargs.values())):
            if func is torch.ops.aten.native_dropout.default and _has_low(args):
                return _dropout(func, args, kwargs)
            return func(*args, **kwargs)
        # Casts made here must not be autocast again (an op autocast falls through keeps it enabled).
        with exclude_dispatch_keys(_NO_AUTOCAST):
            copies: dict = {}
            up_args = [_up(a, copies) for a in args]
            up_kwargs = {k: _up(v, copies) for k, v in kwargs.items()}
            dtypes = _target_dtypes(func, args, kwargs)
            out = func(*up_args, **up_kwargs)
            for pos, name in plan.written:
                if pos < len(args):
                    _write_back(args[pos], up_args[pos])
                elif name in kwargs:
                    _write_back(kwargs[name], up_kwargs[name])
            return _Rounder(dtypes, copies)(out)


@contextmanager
def emulated_kernels():
    """While inside, fp16/bf16 ops compute in fp32 and round each output (enter it before the probe)."""
    mode = _EmulateMode()
    mode.__enter__()
    try:
        yield mode
    finally:
        mode.__exit__(None, None, None)
