"""A WGAN critic at PyTorch's default init; build_critic casts it to fp16 with .half() to halve its memory,
as the training script does before building Adam over its parameters."""
from torch import nn


class Critic(nn.Sequential):
    def __init__(self, ch=16):
        super().__init__(
            nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch * 2, 1, 4), nn.Flatten(),
        )


def build_critic(ch=16):
    return Critic(ch).half()


class Generator(nn.Sequential):
    def __init__(self, nz=8):
        super().__init__(nn.Linear(nz, 3 * 16 * 16), nn.Tanh(), nn.Unflatten(1, (3, 16, 16)))
