"""SNGAN/BigGAN-style critic: spectral norm on every layer, hinge loss."""
import torch
from torch import nn
from torch.nn.utils import spectral_norm


class SNCritic(nn.Module):
    def __init__(self, ch=8):
        super().__init__()
        self.net = nn.Sequential(
            spectral_norm(nn.Conv2d(3, ch, 3, 1, 1)), nn.LeakyReLU(0.1),
            spectral_norm(nn.Conv2d(ch, ch * 2, 4, 2, 1)), nn.LeakyReLU(0.1),
            spectral_norm(nn.Conv2d(ch * 2, ch * 2, 4, 2, 1)), nn.LeakyReLU(0.1),
        )
        self.linear = spectral_norm(nn.Linear(ch * 2 * 16, 1))

    def forward(self, x):
        return self.linear(self.net(x).flatten(1))


class Generator(nn.Module):
    def __init__(self, nz=16):
        super().__init__()
        self.fc = nn.Linear(nz, 3 * 16 * 16)

    def forward(self, z):
        return torch.tanh(self.fc(z)).view(-1, 3, 16, 16)
