"""WGAN-GP done by the book for mixed precision: critic scores under autocast, the penalty computed
outside autocast in fp32, the loss scaled by a GradScaler (nanprobe owns the scaler here)."""
import torch
from torch import nn


class Critic(nn.Module):
    def __init__(self, ch=8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch * 2, 1, 4), nn.Flatten(),
        )

    def forward(self, x):
        return self.net(x)


class Generator(nn.Module):
    def __init__(self, nz=16):
        super().__init__()
        self.fc = nn.Linear(nz, 3 * 16 * 16)

    def forward(self, z):
        return torch.tanh(self.fc(z)).view(-1, 3, 16, 16)


def critic_step(D, G, real, z, scaler=None):
    fake = G(z).detach()
    w_loss = D(fake).mean() - D(real).mean()
    with torch.autocast(real.device.type, enabled=False):
        alpha = torch.rand(real.size(0), 1, 1, 1, device=real.device)
        x_hat = (alpha * real.float() + (1 - alpha) * fake.float()).requires_grad_(True)
        out = D(x_hat)
        grad, = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
        gp = 10.0 * ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
    return {"loss": w_loss + gp, "penalty": gp}
