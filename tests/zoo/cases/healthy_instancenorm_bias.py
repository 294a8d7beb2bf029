"""A WGAN-GP critic as many public implementations write it: each conv keeps its default bias and is
followed by InstanceNorm2d(affine=True), the norm WGAN-GP recommends over batch norm. The norm subtracts
each channel's mean, so those biases do not change the critic's output and their exact gradient is 0:
fp32 computes it as about 1e-8 of rounding noise and fp16 as about 1e-4 of its own."""
import torch.nn as nn


class Discriminator(nn.Module):
    def __init__(self, channels=3, dim=64):
        super().__init__()
        self.main_module = nn.Sequential(
            nn.Conv2d(channels, dim, kernel_size=4, stride=2, padding=1),
            nn.InstanceNorm2d(dim, affine=True),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim, dim * 2, kernel_size=4, stride=2, padding=1),
            nn.InstanceNorm2d(dim * 2, affine=True),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim * 2, dim * 4, kernel_size=4, stride=2, padding=1),
            nn.InstanceNorm2d(dim * 4, affine=True),
            nn.LeakyReLU(0.2, inplace=True))
        self.output = nn.Sequential(nn.Conv2d(dim * 4, 1, kernel_size=4, stride=1, padding=0))

    def forward(self, x):
        x = self.main_module(x)
        return self.output(x)


class Generator(nn.Module):
    def __init__(self, channels=3, nz=32, dim=32):
        super().__init__()
        self.main_module = nn.Sequential(
            nn.ConvTranspose2d(nz, dim * 4, kernel_size=4, stride=1, padding=0),
            nn.BatchNorm2d(dim * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(dim * 4, dim * 2, kernel_size=4, stride=2, padding=1),
            nn.BatchNorm2d(dim * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(dim * 2, dim, kernel_size=4, stride=2, padding=1),
            nn.BatchNorm2d(dim),
            nn.ReLU(True),
            nn.ConvTranspose2d(dim, channels, kernel_size=4, stride=2, padding=1))
        self.output = nn.Tanh()

    def forward(self, x):
        x = self.main_module(x)
        return self.output(x)
