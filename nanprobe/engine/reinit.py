"""model.init: redraw the critic's weights at a standard scale before the replay."""
from __future__ import annotations

import torch
from torch import nn

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
"""Layers with a weight matrix or kernel that an init scheme draws."""


def reinitialise(model: torch.nn.Module, scheme: str, seed: int) -> torch.nn.Module:
    """model.init: "he" redraws conv/linear weights of `model` in place (pass a copy) with
    kaiming_normal_(a=0.2) for LeakyReLU(0.2) and zeroes their biases; "default" leaves it as it is."""
    if scheme == "default":
        return model
    gen = torch.Generator().manual_seed(seed)  # its own generator: the replay's random stream is unchanged
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, WEIGHTED):
                w = torch.empty(m.weight.shape, dtype=torch.float32)
                torch.nn.init.kaiming_normal_(w, a=0.2, nonlinearity="leaky_relu", generator=gen)
                m.weight.copy_(w)
                if m.bias is not None:
                    m.bias.zero_()
    return model
