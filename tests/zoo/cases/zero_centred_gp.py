"""A zero-centred gradient penalty on real images ("0-GP"), adapted from WGAN-GP code: the norm is
written by hand as sqrt(sum(g**2)). The critic has bias-free convs and ReLU, as many do."""
import torch
from torch import nn


class Critic(nn.Module):
    def __init__(self, ch=8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, ch, 3, 2, 1, bias=False), nn.ReLU(),
            nn.Conv2d(ch, ch * 2, 3, 2, 1, bias=False), nn.ReLU(),
        )
        self.head = nn.Linear(ch * 2 * 4 * 4, 1)

    def forward(self, img):
        return self.head(self.body(img).flatten(1))


class Generator(nn.Module):
    def __init__(self, nz=16):
        super().__init__()
        self.fc = nn.Linear(nz, 3 * 16 * 16)

    def forward(self, z):
        return torch.tanh(self.fc(z)).view(-1, 3, 16, 16)


def d_step(D, G, real, z, center=0.0, gamma=10.0):
    fake = G(z).detach()
    real = real.detach().requires_grad_(True)
    d_real = D(real)
    d_fake = D(fake)
    g = torch.autograd.grad(d_real.sum(), real, create_graph=True)[0].view(real.size(0), -1)
    g_norm = torch.sqrt(torch.sum(g ** 2, dim=1))
    gp = gamma * ((g_norm - center) ** 2).mean()
    return {"loss": d_fake.mean() - d_real.mean() + gp, "penalty": gp}
