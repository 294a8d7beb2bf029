"""The small-init WGAN-GP critic of the no-scaling case, now with the AMP gradient-penalty recipe:
the critic's outputs scaled by the GradScaler before autograd.grad, the gradients unscaled after."""
import torch
from torch import nn


def make_critic(width=4, depth=1, std=0.01):
    layers, c = [], 3
    for _ in range(2):
        layers += [nn.Conv2d(c, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        for _ in range(depth):
            layers += [nn.Conv2d(width, width, 3, 1, 1), nn.LeakyReLU(0.2)]
        c = width
    layers += [nn.Conv2d(c, 1, 4), nn.Flatten()]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, std)
    return net


class Generator(nn.Module):
    def __init__(self, latent=16):
        super().__init__()
        self.l1 = nn.Linear(latent, 3 * 16 * 16)

    def forward(self, noise):
        return torch.tanh(self.l1(noise.view(noise.size(0), -1))).view(-1, 3, 16, 16)


def train_d(D, G, imgs, z, scaler=None, lambda_gp=10):
    fake = G(z).detach()
    alpha = torch.rand(imgs.size(0), 1, 1, 1)
    x_hat = (alpha * imgs + (1 - alpha) * fake).requires_grad_(True)
    out = D(x_hat)
    scaled = scaler.scale(out) if scaler is not None else out
    grads = torch.autograd.grad(scaled, x_hat, torch.ones_like(scaled), create_graph=True)[0]
    if scaler is not None:
        grads = grads / scaler.get_scale()
    with torch.autocast(imgs.device.type, enabled=False):
        gp = lambda_gp * ((torch.sqrt(torch.sum(grads.float() ** 2, dim=[1, 2, 3])) - 1) ** 2).mean()
    return {"loss": D(fake).mean() - D(imgs).mean() + gp, "penalty": gp}
