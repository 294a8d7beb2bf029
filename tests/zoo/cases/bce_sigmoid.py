"""A vanilla GAN discriminator that ends in nn.Sigmoid, trained with nn.BCELoss as in the DCGAN
tutorial."""
import torch
from torch import nn


class Discriminator(nn.Module):
    def __init__(self, ndf=8):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(1, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, 1, 4, 1, 0, bias=False), nn.Sigmoid(),
        )

    def forward(self, input):
        return self.main(input)


class Generator(nn.Module):
    def __init__(self, nz=8, ngf=8):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, 1, 4, 4, 0, bias=False), nn.Tanh(),
        )

    def forward(self, input):
        return self.main(input)


criterion = nn.BCELoss()


def train_discriminator(netD, netG, real_cpu, noise):
    b_size = real_cpu.size(0)
    label = torch.full((b_size,), 1.0)
    output = netD(real_cpu).view(-1)
    errD_real = criterion(output, label)
    fake = netG(noise)
    label = torch.full((b_size,), 0.0)
    output = netD(fake.detach()).view(-1)
    errD_fake = criterion(output, label)
    return {"loss": errD_real + errD_fake, "D_x": output.mean()}
