"""StyleGAN2-style non-saturating loss with lazy R1: the penalty every `r1_every` critic steps,
weighted by r1_every; R1 follows the AMP recipe (scaled outputs into autograd.grad, unscaled after)."""
import torch
import torch.nn.functional as F
from torch import nn


class D(nn.Module):
    def __init__(self, ch=8):
        super().__init__()
        self.b1 = nn.Conv2d(3, ch, 3, 2, 1)
        self.b2 = nn.Conv2d(ch, ch * 2, 3, 2, 1)
        self.out = nn.Linear(ch * 2 * 16, 1)
        self.steps_done = 0

    def forward(self, x):
        x = F.leaky_relu(self.b1(x), 0.2)
        x = F.leaky_relu(self.b2(x), 0.2)
        return self.out(x.flatten(1))


class G(nn.Module):
    def __init__(self, w_dim=16):
        super().__init__()
        self.synth = nn.Linear(w_dim, 3 * 16 * 16)

    def forward(self, z, truncation_psi=1.0):
        return torch.tanh(self.synth(z * truncation_psi)).unflatten(1, (3, 16, 16))


def d_step(d, g, real, z, scaler=None, r1_gamma=10.0, r1_every=2):
    fake = g(z).detach()
    loss = F.softplus(d(fake)).mean() + F.softplus(-d(real)).mean()
    out = {"loss": loss}
    if d.steps_done % r1_every == 0:
        real = real.detach().requires_grad_(True)
        logits = d(real)
        s = scaler.get_scale() if scaler is not None else 1.0
        grad, = torch.autograd.grad(logits.sum() * s, real, create_graph=True)
        grad = grad / s
        r1 = grad.square().sum([1, 2, 3]).mean() * (r1_gamma / 2) * r1_every
        out["loss"] = loss + r1
        out["penalty"] = r1
    d.steps_done += 1
    return out
