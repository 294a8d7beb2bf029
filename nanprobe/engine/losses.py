"""The built-in critic losses, written the way user code writes them.

Ops in this file are attributed to their lines here, so a finding in a built-in loss points
at the exact expression (e.g. the hand-written sqrt norm of the penalty).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nanprobe.io.loading import call_generator


@dataclass(frozen=True)
class StepContext:
    """What a built-in loss needs beyond the models and the batch."""

    kind: str
    """wgan-gp | r1 | hinge | non-saturating."""
    gp_weight: float
    """Penalty weight."""
    gp_fp32: bool
    """Compute the penalty outside autocast, in fp32."""
    gp_norm: str
    """sqrt (hand-written) or vector_norm."""
    device_type: str
    """Autocast device type."""
    scaler: Any | None
    """An enabled torch.amp.GradScaler: the penalty follows the AMP recipe."""
    generator_call: object = "z"
    """model.generator_call: "z", "[z]" or a function (generator, z) -> fakes."""


def _fakes(generator, z, real, call):
    if generator is None:
        return torch.randn_like(real)
    with torch.no_grad():
        return call_generator(generator, z, call)


def _grad_norm(grads: torch.Tensor, how: str) -> torch.Tensor:
    g = grads.reshape(grads.shape[0], -1)
    if how == "vector_norm":
        return torch.linalg.vector_norm(g, dim=1)
    return torch.sqrt(torch.sum(g ** 2, dim=1))


def _input_grad(critic, x, ctx: StepContext) -> torch.Tensor:
    """The critic's gradient at x, as the AMP recipe has it when a scaler is on."""
    out = critic(x)
    if ctx.scaler is not None:
        out = ctx.scaler.scale(out)
    grads = torch.autograd.grad(outputs=out, inputs=x, grad_outputs=torch.ones_like(out),
                                create_graph=True, retain_graph=True)[0]
    if ctx.scaler is not None:
        grads = grads * (1.0 / ctx.scaler.get_scale())
    return grads


def _outside_autocast(ctx: StepContext):
    return torch.autocast(ctx.device_type, enabled=False) if ctx.gp_fp32 else nullcontext()


def gradient_penalty(critic, real, fake, ctx: StepContext) -> torch.Tensor:
    """WGAN-GP: lambda * E[(||grad D(x_hat)|| - 1)^2] on random interpolates."""
    alpha = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    with _outside_autocast(ctx):
        # In amp mode the interpolates are fp32 already; in half mode they stay in the model's dtype.
        x_hat = (alpha * real + (1 - alpha) * fake.to(real.dtype)).detach()
        x_hat.requires_grad_(True)
        grads = _input_grad(critic, x_hat, ctx)
        grad_norm = _grad_norm(grads.float() if ctx.gp_fp32 else grads, ctx.gp_norm)
        return ctx.gp_weight * torch.mean((grad_norm - 1) ** 2)


def r1_penalty(critic, real, ctx: StepContext) -> torch.Tensor:
    """R1: gamma / 2 * E[||grad D(x_real)||^2]."""
    with _outside_autocast(ctx):
        x = real.detach()
        x.requires_grad_(True)
        grads = _input_grad(critic, x, ctx)
        g = grads.float() if ctx.gp_fp32 else grads
        return ctx.gp_weight / 2 * torch.sum(g.reshape(g.shape[0], -1) ** 2, dim=1).mean()


def critic_step(critic, generator, real, z, ctx: StepContext) -> dict:
    """One critic loss of the configured kind; returns the loss and its named parts."""
    fake = _fakes(generator, z, real, ctx.generator_call)
    d_real = critic(real)
    d_fake = critic(fake.to(real.dtype))
    if ctx.kind == "wgan-gp":
        loss = d_fake.mean() - d_real.mean()
        penalty = gradient_penalty(critic, real, fake, ctx) if ctx.gp_weight > 0 else None
    elif ctx.kind == "r1":
        loss = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
        penalty = r1_penalty(critic, real, ctx) if ctx.gp_weight > 0 else None
    elif ctx.kind == "hinge":
        loss = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
        penalty = None
    else:  # non-saturating, in the logits form
        loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        penalty = None
    out = {"loss": loss if penalty is None else loss + penalty,
           "d_real": d_real.detach().float().mean(), "d_fake": d_fake.detach().float().mean()}
    if penalty is not None:
        out["penalty"] = penalty.detach()
    return out


def builtin(ctx: StepContext) -> Callable:
    """The built-in step bound to its context, with the custom step's signature."""

    def step(critic, generator, real, z):
        return critic_step(critic, generator, real, z, ctx)

    return step
