"""A StyleGAN-style critic epilogue with minibatch standard deviation, written as in StyleGAN2:
y = (y.square().mean(0) + 1e-8).sqrt(). The critic's input border is zero-padded and its fromRGB
1x1 conv has no bias, so at the border every sample's features are the same (0)."""
import torch
import torch.nn.functional as F
from torch import nn


class MinibatchStd(nn.Module):
    def __init__(self, group_size=4):
        super().__init__()
        self.group_size = group_size

    def forward(self, x):
        n, c, h, w = x.shape
        g = min(self.group_size, n)
        y = x.reshape(g, -1, c, h, w)
        y = y - y.mean(dim=0)
        y = y.square().mean(dim=0)
        y = (y + 1e-8).sqrt()
        y = y.mean(dim=[1, 2, 3])
        y = y.reshape(-1, 1, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)


class Critic(nn.Module):
    def __init__(self, ch=8):
        super().__init__()
        self.from_rgb = nn.Conv2d(3, ch, 1, bias=False)
        self.mbstd = MinibatchStd()
        self.conv = nn.Conv2d(ch + 1, ch, 4, 4)
        self.fc = nn.Linear(ch * 4 * 4, 1)

    def forward(self, img):
        x = F.leaky_relu(self.from_rgb(F.pad(img, (2, 2, 2, 2))), 0.2)
        x = F.leaky_relu(self.conv(self.mbstd(x)), 0.2)
        return self.fc(x.flatten(1))


class Generator(nn.Module):
    def __init__(self, z_dim=8):
        super().__init__()
        self.fc = nn.Linear(z_dim, 3 * 12 * 12)

    def forward(self, z, c=None):
        return torch.tanh(self.fc(z)).view(-1, 3, 12, 12)


def loss_D(D, G, real, z, r1_gamma=1.0):
    fake = G(z).detach()
    real = real.detach().requires_grad_(True)
    real_logits = D(real)
    r1_grads = torch.autograd.grad(real_logits.sum(), real, create_graph=True)[0]
    r1 = r1_grads.square().sum([1, 2, 3]).mean() * (r1_gamma / 2)
    loss = torch.nn.functional.softplus(D(fake)).mean() + torch.nn.functional.softplus(-real_logits).mean()
    return {"loss": loss + r1, "penalty": r1}
