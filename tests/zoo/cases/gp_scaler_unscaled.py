"""WGAN-GP under autocast with a GradScaler for the loss, but the penalty's autograd.grad runs on the
critic's raw outputs (the GradScaler only ever sees the total loss). Norm via .norm(2, dim=1)."""
import random

import torch
from torch import nn


class Critic(nn.Module):
    def __init__(self, nf=8, init_std=0.02):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(3, nf, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(nf, nf * 2, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(nf * 2, nf * 2, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(nf * 2, 1, 4, 1, 0),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0.0, init_std)

    def forward(self, input):
        return self.main(input).view(-1)


class Generator(nn.Module):
    def __init__(self, nz=16):
        super().__init__()
        self.main = nn.Sequential(nn.ConvTranspose2d(nz, 3, 16, 1, 0), nn.Tanh())

    def forward(self, input):
        return self.main(input)


def critic_iter(netD, netG, real, noise, scaler=None, LAMBDA=10):
    fake = netG(noise).detach()
    d_real = netD(real).mean()
    d_fake = netD(fake).mean()
    alpha = torch.full((real.size(0), 1, 1, 1), random.random())
    interpolates = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    disc_interpolates = netD(interpolates)
    gradients = torch.autograd.grad(outputs=disc_interpolates, inputs=interpolates,
                                    grad_outputs=torch.ones(disc_interpolates.size()),
                                    create_graph=True, retain_graph=True, only_inputs=True)[0]
    gradient_penalty = ((gradients.view(gradients.size(0), -1).norm(2, dim=1) - 1) ** 2).mean() * LAMBDA
    return {"loss": d_fake - d_real + gradient_penalty, "penalty": gradient_penalty}
