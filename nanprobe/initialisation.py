"""Weight scale against the He (Kaiming) value for each module's fan-in."""
from __future__ import annotations

import math

import torch


def he_ratios(model: torch.nn.Module, root: str = "critic") -> dict[str, float]:
    """Module path -> std of its weight / sqrt(2 / fan_in), for layers with a weight matrix or kernel."""
    out = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            w = getattr(m, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() < 2 or w.numel() < 2:
                continue
            fan_in = w[0].numel()
            std = float(w.float().std())
            if not math.isfinite(std) or std == 0:
                continue
            out[f"{root}.{name}" if name else root] = std / math.sqrt(2.0 / fan_in)
    return out
