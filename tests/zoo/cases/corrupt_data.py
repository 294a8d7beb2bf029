"""A small conv critic; the batch comes from a file with a broken decode (NaN pixels)."""
from torch import nn


class Critic(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 4), nn.Flatten())

    def forward(self, x):
        return self.net(x)
