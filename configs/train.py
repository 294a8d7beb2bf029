"""A user's own WGAN-GP critic step, written as in the question nanprobe grew from."""
from __future__ import annotations

import torch


def critic_step(critic, generator, real, z, lambda_gp: float = 10.0):
    """Wasserstein loss plus gradient penalty; nanprobe runs it inside autocast, then backward and the step."""
    with torch.no_grad():
        fake = generator(z)
    real_score = critic(real).mean()
    fake_score = critic(fake).mean()

    epsilon = torch.rand(real.size(0), 1, 1, 1, device=real.device)
    interpolated = (epsilon * real + (1 - epsilon) * fake).requires_grad_(True)
    interpolated_output = critic(interpolated)
    gradients = torch.autograd.grad(
        outputs=interpolated_output,
        inputs=interpolated,
        grad_outputs=torch.ones_like(interpolated_output),
        create_graph=True,
        retain_graph=True,
    )[0].view(real.size(0), -1)
    grad_norm = torch.sqrt(torch.sum(gradients ** 2, dim=1))
    gradient_penalty = lambda_gp * torch.mean((grad_norm - 1) ** 2)
    return {"loss": fake_score - real_score + gradient_penalty, "penalty": gradient_penalty,
            "wasserstein": (real_score - fake_score).detach()}
