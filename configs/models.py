"""Example critics and generators for nanprobe's shipped configs: small DCGAN-style GAN models."""
from __future__ import annotations

import torch
from torch import nn


def _init(model: nn.Module, std: float | None) -> None:
    # DCGAN's recipe: conv and linear weights ~ N(0, std); biases keep PyTorch's default.
    if std is None:
        return
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)


class DCGANCritic(nn.Module):
    """WGAN-GP critic: strided 4x4 convs with LeakyReLU(0.2), optional 3x3 convs per stage, no batch norm."""

    def __init__(self, img: int = 32, ch: int = 32, extra: int = 0, init_std: float | None = 0.02, in_ch: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c_in, c, size = in_ch, ch, img
        while size > 4:
            layers += [nn.Conv2d(c_in, c, 4, 2, 1), nn.LeakyReLU(0.2)]
            for _ in range(extra):
                layers += [nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2)]
            c_in, c, size = c, c * 2, size // 2
        layers += [nn.Conv2d(c_in, 1, 4, 1, 0), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        _init(self, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DCGANGenerator(nn.Module):
    """DCGAN generator: a linear projection of z to 4x4, then transposed convs to the image size, tanh."""

    def __init__(self, latent_dim: int = 64, img: int = 32, ch: int = 32, init_std: float | None = 0.02,
                 out_ch: int = 3):
        super().__init__()
        stages = max(0, (img // 4).bit_length() - 1)
        c = ch * 2 ** max(stages - 1, 0)
        self.project = nn.Sequential(nn.Linear(latent_dim, c * 16), nn.ReLU())
        self.c = c
        layers: list[nn.Module] = []
        for _ in range(stages - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1), nn.BatchNorm2d(c // 2), nn.ReLU()]
            c //= 2
        layers += [nn.ConvTranspose2d(c, out_ch, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        _init(self, init_std)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.project(z.flatten(1)).view(z.shape[0], self.c, 4, 4))


class NormCritic(nn.Module):
    """WGAN-GP critic with layer norm (GroupNorm(1, C)) after each hidden conv, as improved-WGAN uses instead of
    batch norm. The convs keep their default bias, which the norm then subtracts again: those biases get a zero
    gradient (a few 1e-9 of rounding noise in fp32)."""

    def __init__(self, img: int = 32, ch: int = 16, in_ch: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        c, size = ch, img // 2
        while size > 4:
            layers += [nn.Conv2d(c, c * 2, 4, 2, 1), nn.GroupNorm(1, c * 2), nn.LeakyReLU(0.2)]
            c, size = c * 2, size // 2
        layers += [nn.Conv2d(c, 1, 4, 1, 0), nn.Flatten()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
