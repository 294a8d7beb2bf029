"""The original GAN's discriminator loss written out by hand from the paper,
-[log D(x) + log(1 - D(G(z)))], with D = sigmoid of the critic's score. The critic is picked up
mid-training: its output layer has drifted to about -20 (critic_args.out_bias)."""
import torch
from torch import nn


class Critic(nn.Module):
    def __init__(self, ch=8, out_bias=-20.0):
        super().__init__()
        self.conv = nn.Conv2d(3, ch, 4, 4)
        self.fc = nn.Linear(ch * 4 * 4, 1)
        with torch.no_grad():
            self.fc.bias.fill_(out_bias)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1)).squeeze(1)


class Generator(nn.Module):
    def __init__(self, k=8):
        super().__init__()
        self.fc = nn.Linear(k, 3 * 16 * 16)

    def forward(self, z):
        return torch.tanh(self.fc(z)).view(-1, 3, 16, 16)


def d_loss(D, G, x, z):
    d_real = torch.sigmoid(D(x))
    d_fake = torch.sigmoid(D(G(z).detach()))
    loss = -(torch.log(d_real) + torch.log(1 - d_fake)).mean()
    return {"loss": loss, "d_real": d_real.mean()}
