"""Per-tensor statistics that show underflow and overflow, without keeping the tensor.

A row is eight numbers: numel, max |x| over finite values, smallest non-zero finite |x|,
zeros, subnormals, +inf, -inf, NaN. On an accelerator the row stays on the device (no sync)
and rows are fetched once per step. On the CPU the row is read from the values' bits: by
nanprobe's C scan (`_rowstats.c`, one read of memory) where it is built, else by torch ops that
skip the counting passes when the tensor has nothing below the smallest normal and nothing
non-finite.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanprobe.engine import compat

_SCAN_VERSION = 1
"""The `_rowstats` interface this module calls (its VERSION)."""
try:
    from nanprobe.engine._rowstats import VERSION, scan
except ImportError:  # built without a C compiler (or one left from an older checkout, without VERSION)
    _SCAN = None
else:  # one left from an older checkout (an editable install not rebuilt) is not used
    _SCAN = scan if VERSION == _SCAN_VERSION else None

NUMEL, MAX_ABS, MIN_NONZERO, ZEROS, SUBNORMAL, POSINF, NEGINF, NAN = range(8)
ROW_WIDTH = 8

_SMALLEST_NORMAL = {dt: torch.finfo(dt).smallest_normal for dt in (torch.float16, torch.bfloat16, torch.float32,
                                                                   torch.float64)}
_FLOATS = frozenset(_SMALLEST_NORMAL)


def is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in _FLOATS and t.numel() > 0


def device_row(x: torch.Tensor) -> torch.Tensor:
    """Full row as a float64 tensor on x's device, with no host synchronisation."""
    x = x.detach()
    a = x.abs()
    tiny = _SMALLEST_NORMAL[x.dtype]
    finite = torch.isfinite(a)
    nonzero = finite & (a > 0)
    inf = torch.tensor(math.inf, dtype=a.dtype, device=a.device)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    parts = [
        torch.tensor(float(x.numel()), dtype=torch.float64, device=a.device),
        torch.where(finite, a, zero).amax().double(),
        torch.where(nonzero, a, inf).amin().double(),
        (a == 0).sum().double(),
        (nonzero & (a < tiny)).sum().double(),
        (x == math.inf).sum().double(),
        (x == -math.inf).sum().double(),
        torch.isnan(x).sum().double(),
    ]
    return torch.stack(parts)


def host_row(x: torch.Tensor, scratch: Scratch | None = None) -> list[float]:
    """Full row as Python floats, read from |x|'s bits: in one read of x's memory where nanprobe's C
    scan is built and x fills one span of CPU memory, else with torch ops (`torch_row`).

    Both give the same numbers: the scan computes, in one pass, the integers the torch ops do in
    several (see `torch_row`), and only non-finite values take the float row (`device_row`).
    """
    x = x.detach()
    scan = _scan_of(x)
    if scan is None:
        return torch_row(x, scratch)
    bits = _BITS[x.dtype]
    hi, lo, zeros, small = scan(x.data_ptr(), x.numel(), x.element_size(), bits.tiny, bits.inf)
    if hi >= bits.inf:
        return device_row(x).tolist()
    return bits.finite_row(float(x.numel()), hi, lo, float(zeros), float(small - zeros))


def torch_row(x: torch.Tensor, scratch: Scratch | None = None) -> list[float]:
    """`host_row` with torch ops: one abs and one integer aminmax when all is normal and finite.

    With the sign cleared, a float's bits ordered as an integer order its magnitude, zero is 0,
    subnormals lie below the smallest normal's bits and inf/NaN above the largest finite's. The
    integer passes (count_nonzero, amin, a shift) are several times faster on the CPU than the
    float ones (a float count_nonzero or comparison), and they give the same numbers. Exact zeros
    (after a ReLU, in a gradient) cost a count and three in-place passes for the smallest non-zero,
    subnormals a shift and a count (after |x| again when there were zeros), and only non-finite
    values take the full row. |x| goes into `scratch` when given, so that a replay does
    not fault in a fresh buffer for every op.
    """
    x = _memory_order(x.detach())
    bits = _BITS[x.dtype]
    k = _magnitude(x, scratch).view(bits.int_dtype)
    n = float(x.numel())
    lo, hi = (int(v) for v in torch.aminmax(k))
    if hi >= bits.inf:
        return device_row(x).tolist()
    if lo >= bits.tiny:
        return bits.finite_row(n, hi, lo, 0.0, 0.0)
    zeros = 0.0
    if lo == 0:
        zeros = n - float(torch.count_nonzero(k))
        if zeros == n:
            return bits.finite_row(n, hi, lo, zeros, 0.0)
        lo = int(k.sub_(1).bitwise_and_(bits.magnitude).amin()) + 1  # in place: zero wraps to the largest pattern
        if lo < bits.tiny:
            k = _magnitude(x, scratch).view(bits.int_dtype)  # |x| again, for the count below
    small = 0.0
    if lo < bits.tiny:  # zeros and subnormals are the values whose exponent field is 0
        small = n - float(torch.count_nonzero(k.bitwise_right_shift_(bits.mantissa))) - zeros
    return bits.finite_row(n, hi, lo, zeros, small)


class Scratch:
    """One buffer that |x| is written into, reused from op to op (bytes, grown to the largest tensor seen)."""

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor of x's dtype and shape in the buffer (its values are not kept)."""
        nbytes = x.numel() * x.element_size()
        if self._buf.numel() < nbytes or self._buf.device != x.device:
            self._buf = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
        return self._buf[:nbytes].view(x.dtype).view(x.shape)


def dense(x: torch.Tensor) -> bool:
    """Whether x's values fill one span of memory with no gaps or repeats (contiguous, permuted or channels-last)."""
    if x.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _memory_order(x: torch.Tensor) -> torch.Tensor:
    """x's values as a flat tensor in the order they lie in memory, when they fill one span of it.

    A row's numbers do not depend on the order of the values, and a permuted or channels-last
    output (a convolution's gradient) read in memory order is ten times faster to copy than read in
    its index order. A strided slice, which leaves gaps, stays as it is.
    """
    if x.is_contiguous():
        return x.reshape(-1)
    return x.as_strided((x.numel(),), (1,)) if dense(x) else x


def has_c_scan() -> bool:
    """Whether nanprobe's C scan is built and loaded (else rows on the CPU come from torch ops)."""
    return _SCAN is not None


def _scan_of(x: torch.Tensor) -> Callable | None:
    """The C scan, for a plain dense CPU tensor (its memory is one span of its values), else None."""
    if _SCAN is None or type(x) is not torch.Tensor or x.device.type != "cpu" or x.layout != torch.strided:
        return None
    if compat.is_zero_tensor(x) or not dense(x):
        return None
    return _SCAN


def _magnitude(x: torch.Tensor, scratch: Scratch | None) -> torch.Tensor:
    """|x| in a tensor of this module's own, free to change in place."""
    return x.abs() if scratch is None else torch.abs(x, out=scratch.like(x))


@dataclass(frozen=True)
class _Bits:
    """The bit layout of one floating-point dtype."""

    int_dtype: torch.dtype
    """The signed integer dtype of the same width, to view its bits as."""
    mantissa: int
    """Mantissa bits: the exponent field starts above them."""
    tiny: int
    """The smallest normal's bits."""
    inf: int
    """+inf's bits: every exponent bit set, the mantissa zero."""
    magnitude: int
    """Every bit but the sign."""
    formats: tuple[str, str, int]
    """struct's (integer, float) formats and the shift that turn a bit pattern into its value."""

    @classmethod
    def of(cls, int_dtype: torch.dtype, mantissa: int, formats: tuple[str, str, int]) -> _Bits:
        magnitude = (1 << (torch.iinfo(int_dtype).bits - 1)) - 1
        return cls(int_dtype, mantissa, 1 << mantissa, magnitude >> mantissa << mantissa, magnitude, formats)

    def value(self, pattern: int) -> float:
        i, f, shift = self.formats
        return struct.unpack(f, struct.pack(i, pattern << shift))[0]

    def finite_row(self, n: float, hi: int, lo: int, zeros: float, subnormals: float) -> list[float]:
        """The row of n finite values from the bit patterns of their largest and smallest non-zero magnitude
        (`lo` is not read when all n are zero)."""
        if zeros == n:
            return [n, 0.0, math.inf, zeros, 0.0, 0.0, 0.0, 0.0]
        return [n, self.value(hi), self.value(lo), zeros, subnormals, 0.0, 0.0, 0.0]


_BITS = {
    torch.float16: _Bits.of(torch.int16, 10, ("<H", "<e", 0)),
    torch.bfloat16: _Bits.of(torch.int16, 7, ("<I", "<f", 16)),  # bf16 is fp32's top half
    torch.float32: _Bits.of(torch.int32, 23, ("<I", "<f", 0)),
    torch.float64: _Bits.of(torch.int64, 52, ("<Q", "<d", 0)),
}


def constant_row(value: float, numel: int, dtype: torch.dtype) -> list[float]:
    """The row of a tensor filled with one value (zeros_like, full, fill_), without reading it."""
    n = float(numel)
    if value != value:
        return [n, 0.0, math.inf, 0.0, 0.0, 0.0, 0.0, n]
    if math.isinf(value):
        return [n, 0.0, math.inf, 0.0, 0.0, n if value > 0 else 0.0, n if value < 0 else 0.0, 0.0]
    v = abs(value)
    if v == 0:
        return [n, 0.0, math.inf, n, 0.0, 0.0, 0.0, 0.0]
    return [n, v, v, 0.0, n if v < _SMALLEST_NORMAL[dtype] else 0.0, 0.0, 0.0, 0.0]


_WIDER = frozenset({(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float64),
                    (torch.bfloat16, torch.float64), (torch.float32, torch.float64)})


def cast_row(row: list[float], src: torch.dtype, out: torch.dtype) -> list[float] | None:
    """The row of `row`'s values cast from `src` to `out`, or None when only measuring can tell.

    A widening cast changes no value: only which values count as subnormal can change, and the
    wider dtype's smallest normal is the same (bf16 -> fp32) or below the source's smallest
    non-zero value (fp16 -> fp32: 6e-8 against 1e-38). A narrowing cast (an autocast cast to fp16
    or bf16) rounds to nearest, which is monotone: the largest and the smallest non-zero magnitudes
    become the rounded ones, and every count stays as it was when the largest does not round to inf
    and the smallest non-zero is at or above `out`'s smallest normal (nothing is flushed to 0 or
    made subnormal). Anything else (an overflow, values near the bottom of the range) is measured.
    """
    if src == out:
        return list(row)
    if src not in _SMALLEST_NORMAL or out not in _SMALLEST_NORMAL:
        return None
    cast = list(row)
    tiny = _SMALLEST_NORMAL[out]
    if (src, out) in _WIDER:
        if tiny == _SMALLEST_NORMAL[src]:
            return cast
        if row[MIN_NONZERO] >= tiny:
            cast[SUBNORMAL] = 0.0
            return cast
        return None
    lo = row[MIN_NONZERO]
    if lo < tiny:
        return None
    # Rounded by the same conversion the cast itself runs (the value is exact in src).
    hi, lo = torch.tensor([row[MAX_ABS], 0.0 if math.isinf(lo) else lo], dtype=src).to(out).tolist()
    if math.isinf(hi):
        return None
    cast[MAX_ABS] = hi
    if not math.isinf(row[MIN_NONZERO]):
        cast[MIN_NONZERO] = lo
    cast[SUBNORMAL] = 0.0
    return cast


def merge(rows: list[list[float]]) -> list[float]:
    """One row for several tensors (an op with several outputs)."""
    if len(rows) == 1:
        return rows[0]
    out = [0.0] * ROW_WIDTH
    out[MAX_ABS] = max(r[MAX_ABS] for r in rows)
    out[MIN_NONZERO] = min(r[MIN_NONZERO] for r in rows)
    for i in (NUMEL, ZEROS, SUBNORMAL, POSINF, NEGINF, NAN):
        out[i] = sum(r[i] for r in rows)
    return out


@dataclass(frozen=True)
class TensorStats:
    """The statistics of one op's output, as the report shows them."""

    numel: int
    """Number of values."""
    max_abs: float
    """Largest finite |x|."""
    min_nonzero: float | None
    """Smallest non-zero finite |x| (None when there is none)."""
    zeros: int
    """Values exactly zero."""
    subnormal: int
    """Non-zero values below the dtype's smallest normal."""
    posinf: int
    """+inf values."""
    neginf: int
    """-inf values."""
    nan: int
    """NaN values."""

    @classmethod
    def of(cls, row: list[float]) -> TensorStats:
        mn = row[MIN_NONZERO]
        return cls(int(row[NUMEL]), float(row[MAX_ABS]), None if math.isinf(mn) else float(mn),
                   int(row[ZEROS]), int(row[SUBNORMAL]), int(row[POSINF]), int(row[NEGINF]), int(row[NAN]))
