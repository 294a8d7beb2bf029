"""An all-convolutional WGAN-GP critic: 3x3 convs with LeakyReLU at the image's resolution, global average
pooling and a linear score (as ResNet-style critics end), no batch norm (the penalty is per sample),
initialised with DCGAN's weights_init: weights N(0, 0.02), biases at PyTorch's default."""
from torch import nn


def weights_init(m):
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)


class Critic(nn.Module):
    def __init__(self, nc=3, ch=16, depth=4):
        super().__init__()
        layers = [nn.Conv2d(nc, ch, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True)]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(ch, ch, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True)]
        self.features = nn.Sequential(*layers)
        self.score = nn.Linear(ch, 1)
        self.apply(weights_init)

    def forward(self, x):
        h = self.features(x).mean(dim=(2, 3))  # global average pooling
        return self.score(h).view(-1)


class Generator(nn.Module):
    def __init__(self, nz=16, nc=3, ngf=8):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 2, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),
        )
        self.apply(weights_init)

    def forward(self, z):
        return self.main(z)
