"""Lost updates: weights an optimizer step leaves unchanged although it meant to move them.

In a low-precision weight, `w + update` rounds back to `w` when |update| is below half an ulp of
`w` (fp16 near 1: 4.9e-4; bf16: 3.9e-3), so a small learning rate stops training without a
warning. The replay snapshots each weight before the step and compares after it.
"""
from __future__ import annotations

import torch

# Optimizer state that moves a weight even where this step's gradient is 0.
_MOMENTUM_STATE = ("exp_avg", "momentum_buffer")


def snapshot(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of the weights before the optimizer step."""
    return {name: p.detach().clone() for name, p in params.items()}


def _intended(p: torch.Tensor, state: dict, weight_decay: float) -> torch.Tensor:
    """Elements the step meant to move: a non-zero gradient, momentum or weight decay."""
    moving = torch.zeros_like(p, dtype=torch.bool) if p.grad is None else p.grad != 0
    for key in _MOMENTUM_STATE:
        buf = state.get(key)
        if isinstance(buf, torch.Tensor) and buf.shape == p.shape:
            moving |= buf != 0
    if weight_decay:
        moving |= p.detach() != 0
    return moving


def lost(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor],
         before: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Parameter name -> (elements meant to move, elements left unchanged) for this step."""
    decay = {id(p): g.get("weight_decay", 0.0) for g in optimizer.param_groups for p in g["params"]}
    out = {}
    with torch.no_grad():
        for name, p in params.items():
            old = before[name]
            moving = _intended(p, optimizer.state.get(p, {}), decay.get(id(p), 0.0)) & torch.isfinite(old)
            n = int(moving.sum())
            if n:
                out[name] = (n, int((moving & (p == old)).sum()))
    return out
