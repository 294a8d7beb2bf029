"""A ProGAN-style critic for 28x28 digits, padded to 32x32 as in the paper's MNIST set-up, with a
1x1 fromRGB conv and a PixelNorm written as in ProGAN: x * rsqrt(mean(x*x) + 1e-8)."""
import torch
import torch.nn.functional as F
from torch import nn


class PixelNorm(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(torch.mean(x * x, dim=1, keepdim=True) + 1e-8)


class Critic(nn.Module):
    def __init__(self, ch=8):
        super().__init__()
        self.from_rgb = nn.Conv2d(1, ch, 1, bias=False)
        self.norm = PixelNorm()
        self.conv = nn.Conv2d(ch, ch, 4, 4)
        self.act = nn.LeakyReLU(0.2)
        self.out = nn.Linear(ch * 8 * 8, 1)

    def forward(self, x):
        x = F.pad(x, (2, 2, 2, 2))  # 28x28 -> 32x32 with a zero border
        x = self.norm(self.from_rgb(x))
        return self.out(self.act(self.conv(x)).flatten(1))


class Generator(nn.Module):
    def __init__(self, nz=8):
        super().__init__()
        self.fc = nn.Linear(nz, 28 * 28)

    def forward(self, z):
        return torch.tanh(self.fc(z.flatten(1))).view(-1, 1, 28, 28)
