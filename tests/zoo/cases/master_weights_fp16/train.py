"""The WGAN critic loss for one step (weight clipping is done by the training loop after opt.step())."""


def wgan_step(critic, generator, real, z):
    fake = generator(z).detach()
    return critic(fake).mean() - critic(real).mean()
