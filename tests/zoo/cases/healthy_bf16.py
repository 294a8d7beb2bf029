"""A DCGAN WGAN-GP critic trained under bf16 autocast, the penalty inside autocast (no scaler needed:
bf16 has fp32's exponent range)."""
from torch import nn


def critic(nc=3, ndf=8):
    return nn.Sequential(
        nn.Conv2d(nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 2, 1, 4, 1, 0), nn.Flatten(),
    )


def generator(nz=16):
    return nn.Sequential(nn.Linear(nz, 3 * 16 * 16), nn.Tanh(), nn.Unflatten(1, (3, 16, 16)))
