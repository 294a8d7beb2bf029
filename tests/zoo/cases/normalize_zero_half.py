"""A projection-style critic that compares L2-normalised features with a learned direction
(cosine score, as in contrastive discriminators). Bias-free convs and ReLU: a black frame gives an
all-zero feature vector, which F.normalize maps to 0 thanks to its eps=1e-12."""
import torch
import torch.nn.functional as F
from torch import nn


class Critic(nn.Module):
    def __init__(self, ch=8, dim=16):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, ch, 4, 4, bias=False), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(ch * 16, dim, bias=False), nn.ReLU())
        self.direction = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        h = F.normalize(self.enc(x), dim=1)
        return 10 * (h * F.normalize(self.direction, dim=0)).sum(1)


class Generator(nn.Module):
    def __init__(self, nz=8):
        super().__init__()
        self.fc = nn.Linear(nz, 3 * 16 * 16)

    def forward(self, z):
        return torch.tanh(self.fc(z)).view(-1, 3, 16, 16)
