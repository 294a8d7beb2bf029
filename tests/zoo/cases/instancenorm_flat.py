"""A CycleGAN-style PatchGAN critic (InstanceNorm after every conv but the first and last, as in
CycleGAN's NLayerDiscriminator) trained as a WGAN-GP critic on sky crops: nearly flat images, as the
generator's are at first."""
import torch
from torch import nn


class PatchCritic(nn.Module):
    def __init__(self, ndf=8, n_layers=2):
        super().__init__()
        seq = [nn.Conv2d(3, ndf, 3, 1, 1), nn.LeakyReLU(0.2, True)]
        for _ in range(n_layers):
            seq += [nn.Conv2d(ndf, ndf, 3, 1, 1), nn.InstanceNorm2d(ndf, affine=True), nn.LeakyReLU(0.2, True)]
        seq += [nn.Conv2d(ndf, 1, 4, 4, 0)]
        self.model = nn.Sequential(*seq)

    def forward(self, input):
        return self.model(input).flatten(1)


class Generator(nn.Module):
    def __init__(self, nz=8):
        super().__init__()
        self.fc = nn.Linear(nz, 3 * 16 * 16)

    def forward(self, z):
        # at init its images are nearly flat grey, as a generator's early samples are
        return (0.5 + 1e-3 * torch.tanh(self.fc(z))).view(-1, 3, 16, 16)
