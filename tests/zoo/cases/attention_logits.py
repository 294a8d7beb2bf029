"""A SAGAN-style critic with self-attention over the pixels of an early feature map. The images are
fed as 0..255 floats, and the logits are divided by d ** -0.5 where d ** 0.5 was meant (a typo that
multiplies them by sqrt(d) instead of scaling them down)."""
import torch
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.q = nn.Conv2d(ch, ch // 2, 1)
        self.k = nn.Conv2d(ch, ch // 2, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.d = ch // 2

    def forward(self, x):
        b, c, h, w = x.shape
        q = self.q(x).flatten(2).transpose(1, 2)          # b, hw, c/2
        k = self.k(x).flatten(2)                          # b, c/2, hw
        attn = torch.softmax(torch.bmm(q, k) / self.d ** -0.5, dim=-1)  # meant: * d ** -0.5
        v = self.v(x).flatten(2)
        out = torch.bmm(v, attn.transpose(1, 2)).view(b, c, h, w)
        return x + self.gamma * out


class Critic(nn.Module):
    def __init__(self, ch=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, ch, 4, 2, 1)
        self.attn = SelfAttention(ch)
        self.conv2 = nn.Conv2d(ch, 1, 8)

    def forward(self, x):
        return self.conv2(self.attn(torch.relu(self.conv1(x)))).view(-1)


class Generator(nn.Module):
    def __init__(self, nz=8):
        super().__init__()
        self.fc = nn.Linear(nz, 3 * 16 * 16)

    def forward(self, z):
        return 127.5 * (torch.tanh(self.fc(z)) + 1).view(-1, 3, 16, 16)


def critic_step(D, G, real, z):
    fake = G(z).detach()
    return torch.relu(1 - D(real)).mean() + torch.relu(1 + D(fake)).mean()
