"""A CycleGAN-style PatchGAN critic (InstanceNorm after each strided conv) trained as a WGAN-GP
critic on sky crops: nearly flat images."""
import torch
from torch import nn


class PatchCritic(nn.Module):
    def __init__(self, ndf=8):
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(3, ndf, 4, 2, 1), nn.InstanceNorm2d(ndf, affine=True), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1), nn.InstanceNorm2d(ndf * 2, affine=True), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 2, ndf * 2, 3, 1, 1), nn.InstanceNorm2d(ndf * 2, affine=True), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 2, ndf * 2, 3, 1, 1), nn.InstanceNorm2d(ndf * 2, affine=True), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 2, 1, 4, 1, 0),
        )

    def forward(self, input):
        return self.model(input).flatten(1)


class Generator(nn.Module):
    def __init__(self, nz=8):
        super().__init__()
        self.fc = nn.Linear(nz, 3 * 16 * 16)

    def forward(self, z):
        return 0.5 + 0.001 * torch.tanh(self.fc(z)).view(-1, 3, 16, 16)
