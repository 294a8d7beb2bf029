"""The critic's loss for one step of the AMP training loop (train.py calls it under autocast, then
scaler.scale(loss_d).backward(); scaler.step(opt_d); scaler.update())."""
import torch


def critic_loss(netD, netG, real, noise, lambda_gp=10.0):
    fake = netG(noise).detach()
    loss_d = netD(fake).mean() - netD(real).mean()
    # gradient penalty (Gulrajani et al. 2017) on random interpolates
    alpha = torch.rand(real.size(0), 1, 1, 1, device=real.device)
    interp = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    critic_out = netD(interp)
    grad = torch.autograd.grad(critic_out.sum(), interp, create_graph=True)[0]
    grad_norm = torch.sqrt((grad.flatten(1) ** 2).sum(dim=1))
    gp = lambda_gp * ((grad_norm - 1) ** 2).mean()
    return {"loss": loss_d + gp, "penalty": gp}
