"""The critic's hinge loss (Lim & Ye 2017; SAGAN, BigGAN) for one step."""
import torch.nn.functional as F


def d_hinge_step(critic, generator, real, z):
    fake = generator(z).detach()
    return F.relu(1.0 - critic(real)).mean() + F.relu(1.0 + critic(fake)).mean()
