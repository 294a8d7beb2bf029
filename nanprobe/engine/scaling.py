"""Loss scaling: does the penalty follow the AMP recipe under a GradScaler?

The recipe scales the critic's outputs with `scaler.scale` before `torch.autograd.grad` and
multiplies the gradients by 1/scale after, so the penalty's input gradient is lifted out of
fp16's underflow range like the rest of the backward. `RecipeWatch` records every
`torch.autograd.grad` call whose outputs did not come from `scaler.scale`.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.weak import WeakTensorKeyDictionary


def takes_scaler(fn: Callable) -> bool:
    """True when a custom step accepts the GradScaler as `scaler=` (or **kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "scaler" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _flat(values) -> list:
    if isinstance(values, torch.Tensor):
        return [values]
    if isinstance(values, (list, tuple)):
        return [t for v in values for t in _flat(v)]
    if isinstance(values, dict):
        return [t for v in values.values() for t in _flat(v)]
    return []


class RecipeWatch:
    """While active, `torch.autograd.grad` calls on unscaled outputs are passed to `on_unscaled`.

    Only calls made through the `torch.autograd.grad` attribute are seen (not a `grad` imported
    by name before the replay); both patches are undone on exit.
    """

    def __init__(self, scaler, on_unscaled: Callable[[], None]):
        self.scaler = scaler
        self.on_unscaled = on_unscaled
        self._scaled = WeakTensorKeyDictionary()
        self._grad: Callable[..., Any] | None = None

    def __enter__(self) -> RecipeWatch:
        grad, scale, scaled = torch.autograd.grad, self.scaler.scale, self._scaled

        def scale_and_mark(outputs):
            out = scale(outputs)
            for t in _flat(out):
                scaled[t] = True
            return out

        def watched_grad(outputs, *args, **kwargs):
            outs = _flat(outputs)
            if outs and not any(t in scaled for t in outs):
                self.on_unscaled()
            return grad(outputs, *args, **kwargs)

        self._grad = grad
        self.scaler.scale = scale_and_mark  # instance attribute: shadows the method until __exit__
        torch.autograd.grad = watched_grad
        return self

    def __exit__(self, *exc) -> None:
        try:
            torch.autograd.grad = self._grad  # type: ignore[assignment]  # restores the function saved in __enter__
        finally:
            self.scaler.__dict__.pop("scale", None)
