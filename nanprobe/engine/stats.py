"""Per-tensor statistics that show underflow and overflow, without keeping the tensor.

A row is eight numbers: numel, max |x| over finite values, smallest non-zero finite |x|,
zeros, subnormals, +inf, -inf, NaN. On an accelerator the row stays on the device (no sync)
and rows are fetched once per step; on the CPU a fast path skips the counting passes when
the tensor has nothing below the smallest normal and nothing non-finite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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


def host_row(x: torch.Tensor) -> list[float]:
    """Full row as Python floats; one abs and one aminmax pass when the tensor is all normal and finite.

    The other passes run only when their answer is not already known: exact zeros (after a ReLU,
    in a gradient) cost one more pass, subnormals one more, and only non-finite values take the
    full row.
    """
    x = x.detach()
    a = x.abs()
    n = float(x.numel())
    lo, hi = (v.item() for v in torch.aminmax(a))
    tiny = _SMALLEST_NORMAL[x.dtype]
    if lo >= tiny and hi < math.inf:
        return [n, hi, lo, 0.0, 0.0, 0.0, 0.0, 0.0]
    if not (hi == hi and hi < math.inf):
        return device_row(x).tolist()
    zeros, min_nz = 0.0, lo
    if lo == 0:
        zeros = n - float(torch.count_nonzero(a).item())
        if zeros < n:
            # `a` is this function's own copy: the zeros become inf in place (a one-byte mask, no float copy),
            # so amin gives the smallest non-zero value and the count below counts subnormals only.
            a.masked_fill_(a == 0, math.inf)
            min_nz = a.amin().item()
        else:
            min_nz = math.inf
    small = float(torch.count_nonzero(a < tiny).item()) if min_nz < tiny else 0.0
    return [n, hi, min_nz, zeros, small, 0.0, 0.0, 0.0]


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
