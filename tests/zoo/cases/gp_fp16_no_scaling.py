"""A DCGAN-style WGAN-GP critic (small init, several 3x3 convs per stage) and the WGAN-GP step as
most tutorials write it, with a hand-written norm, run under fp16 autocast without loss scaling."""
import numpy as np
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


def compute_gradient_penalty(D, real_samples, fake_samples):
    alpha = torch.tensor(np.random.random((real_samples.size(0), 1, 1, 1)), dtype=real_samples.dtype)
    interpolates = (alpha * real_samples + ((1 - alpha) * fake_samples)).requires_grad_(True)
    d_interpolates = D(interpolates)
    gradients = torch.autograd.grad(
        outputs=d_interpolates, inputs=interpolates, grad_outputs=torch.ones_like(d_interpolates),
        create_graph=True, retain_graph=True, only_inputs=True,
    )[0]
    gradients = gradients.view(gradients.size(0), -1)
    return ((torch.sqrt(torch.sum(gradients ** 2, dim=1)) - 1) ** 2).mean()


def train_d(D, G, imgs, z, lambda_gp=10):
    fake_imgs = G(z).detach()
    gp = compute_gradient_penalty(D, imgs, fake_imgs)
    return {"loss": -torch.mean(D(imgs)) + torch.mean(D(fake_imgs)) + lambda_gp * gp, "penalty": lambda_gp * gp}
