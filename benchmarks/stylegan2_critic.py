"""A StyleGAN2-sized residual critic for the scale benchmark (about 24M parameters at 256x256).

The architecture follows StyleGAN2's discriminator (config-f channel widths, residual blocks with
a 1x1 skip, minibatch standard deviation, LeakyReLU(0.2)); blur filters and equalised learning
rate are left out because they do not change the cost or the numerics the probe sees.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _channels(res: int) -> int:
    return min(16384 // res, 512)


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv0 = nn.Conv2d(c_in, c_in, 3, 1, 1)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.avg_pool2d(self.skip(x), 2)
        x = F.leaky_relu(self.conv0(x), 0.2)
        x = F.avg_pool2d(F.leaky_relu(self.conv1(x), 0.2), 2)
        return (x + y) / math.sqrt(2)


class StyleGAN2Critic(nn.Module):
    """Residual critic for img x img RGB input (img a power of two >= 8); one score per sample."""

    def __init__(self, img: int = 256, group: int = 4):
        super().__init__()
        self.group = group
        self.from_rgb = nn.Conv2d(3, _channels(img), 1)
        blocks, res = [], img
        while res > 4:
            blocks.append(_Block(_channels(res), _channels(res // 2)))
            res //= 2
        self.blocks = nn.Sequential(*blocks)
        c = _channels(4)
        self.conv = nn.Conv2d(c + 1, c, 3, 1, 1)
        self.fc = nn.Linear(c * 16, c)
        self.out = nn.Linear(c, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, a=0.2)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.from_rgb(x), 0.2)
        x = self.blocks(x)
        b, c, h, w = x.shape
        g = min(self.group, b)
        # Minibatch standard deviation, as StyleGAN2 computes it.
        y = x.reshape(g, -1, c, h, w)
        y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt().mean([1, 2, 3])
        y = y.reshape(-1, 1, 1, 1).repeat(g, 1, h, w)
        x = F.leaky_relu(self.conv(torch.cat([x, y], 1)), 0.2)
        x = F.leaky_relu(self.fc(x.flatten(1)), 0.2)
        return self.out(x)
