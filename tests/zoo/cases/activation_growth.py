"""A critic of residual-free conv blocks at He init, each with a learned output gain (as in
"SkipInit"/StyleGAN's activation gain). Picked up mid-training, the gains have grown to ~4
(critic_args.gain), so activations grow ~4x per block."""
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, ch, gain):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)
        nn.init.kaiming_normal_(self.conv.weight, a=0.2)
        nn.init.zeros_(self.conv.bias)
        self.gain = nn.Parameter(torch.tensor(float(gain)))

    def forward(self, x):
        return F.leaky_relu(self.conv(x), 0.2) * self.gain


class Critic(nn.Module):
    def __init__(self, ch=8, blocks=8, gain=4.0):
        super().__init__()
        self.stem = nn.Conv2d(3, ch, 3, 1, 1)
        self.blocks = nn.Sequential(*[Block(ch, gain) for _ in range(blocks)])
        self.head = nn.Linear(ch, 1)

    def forward(self, x):
        h = self.blocks(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))


def make_generator():
    # no learned generator yet: fakes are squashed noise
    return nn.Sequential(nn.Unflatten(1, (3, 8, 8)), nn.Tanh())
