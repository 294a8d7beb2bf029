"""A StyleGAN-like critic: equalized learning rate (weights N(0, 1), scaled by 1/sqrt(fan_in) at run
time), minibatch standard deviation with an eps, computed in fp32 as StyleGAN's epilogue does,
softplus (logistic) loss."""
import math

import torch
import torch.nn.functional as F
from torch import nn


class EqualConv2d(nn.Module):
    def __init__(self, cin, cout, k, stride=1, padding=0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = 1 / math.sqrt(cin * k * k)
        self.stride, self.padding = stride, padding

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, self.stride, self.padding)


class EqualLinear(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = 1 / math.sqrt(cin)

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias)


def minibatch_stddev(x, group=4, eps=1e-8):
    n, c, h, w = x.shape
    group = min(group, n)
    y = x.float().reshape(group, -1, c, h, w)
    y = (y - y.mean(0)).square().mean(0)
    y = (y + eps).sqrt().mean(dim=[1, 2, 3]).reshape(-1, 1, 1, 1).repeat(group, 1, h, w)
    return torch.cat([x, y.to(x.dtype)], 1)


class Discriminator(nn.Module):
    def __init__(self, ch=8):
        super().__init__()
        self.from_rgb = EqualConv2d(3, ch, 1)
        self.down = EqualConv2d(ch, ch, 3, 2, 1)
        self.final_conv = EqualConv2d(ch + 1, ch, 3, 1, 1)
        self.final_linear = EqualLinear(ch * 8 * 8, 1)

    def forward(self, x):
        x = F.leaky_relu(self.from_rgb(x), 0.2) * math.sqrt(2)
        x = F.leaky_relu(self.down(x), 0.2) * math.sqrt(2)
        with torch.autocast(x.device.type, enabled=False):  # the epilogue in fp32
            x = minibatch_stddev(x.float())
            x = F.leaky_relu(self.final_conv(x), 0.2) * math.sqrt(2)
            return self.final_linear(x.flatten(1))


class Generator(nn.Module):
    def __init__(self, z_dim=16):
        super().__init__()
        self.fc = nn.Linear(z_dim, 3 * 16 * 16)

    def forward(self, z, c=None, truncation_psi=1):
        return torch.tanh(self.fc(z)).view(-1, 3, 16, 16)


def d_logistic(D, G, real, z):
    fake = G(z).detach()
    return F.softplus(D(fake)).mean() + F.softplus(-D(real)).mean()
