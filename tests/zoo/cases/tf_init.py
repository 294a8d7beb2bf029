"""A critic ported from a TensorFlow 1 tutorial: every weight drawn with tf.random_normal's default
stddev=1.0 instead of Glorot/He."""
import torch
from torch import nn


def weights_init(m):
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(m.weight, mean=0.0, std=1.0)
        nn.init.zeros_(m.bias)


class Critic(nn.Module):
    def __init__(self, ch=16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, ch, 3, 1, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch, ch, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch, ch, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch, ch, 3, 1, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch, ch, 3, 1, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch, ch, 3, 1, 1), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(ch * 4 * 4, 1),
        )
        self.apply(weights_init)

    def forward(self, x):
        return self.net(x)


class Generator(nn.Module):
    def __init__(self, nz=8):
        super().__init__()
        self.fc = nn.Linear(nz, 3 * 16 * 16)

    def forward(self, z):
        return torch.tanh(self.fc(z)).view(-1, 3, 16, 16)
