"""A critic with layer norm without affine parameters (GroupNorm(1, C, affine=False)); the training
script casts it to fp16 with .half() to save memory and trains it with torch.optim.Adam at its default
eps (1e-8)."""
import torch
from torch import nn


class Critic(nn.Module):
    def __init__(self, ch=8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.GroupNorm(1, ch * 2, affine=False), nn.LeakyReLU(0.2),
            nn.Conv2d(ch * 2, 1, 4), nn.Flatten(),
        )

    def forward(self, x):
        return self.net(x)


class Generator(nn.Module):
    def __init__(self, latent_dim=8):
        super().__init__()
        self.fc = nn.Linear(latent_dim, 3 * 16 * 16)

    def forward(self, z):
        return torch.tanh(self.fc(z)).reshape(len(z), 3, 16, 16)
