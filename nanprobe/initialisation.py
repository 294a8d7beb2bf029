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


_LAYERS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
           torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d, torch.nn.Linear)


def reinitialise(model: torch.nn.Module, scheme: str, seed: int) -> torch.nn.Module:
    """model.init: "he" redraws conv/linear weights of `model` in place (pass a copy) with
    kaiming_normal_(a=0.2) for LeakyReLU(0.2) and zeroes their biases; "default" leaves it as it is."""
    if scheme == "default":
        return model
    gen = torch.Generator().manual_seed(seed)  # its own generator: the replay's random stream is unchanged
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _LAYERS):
                w = torch.empty(m.weight.shape, dtype=torch.float32)
                torch.nn.init.kaiming_normal_(w, a=0.2, nonlinearity="leaky_relu", generator=gen)
                m.weight.copy_(w)
                if m.bias is not None:
                    m.bias.zero_()
    return model
