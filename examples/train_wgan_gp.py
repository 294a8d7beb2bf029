"""A plain PyTorch WGAN-GP training script under fp16 autocast, watched by nanprobe.watch.

    python examples/train_wgan_gp.py                      # goes NaN; nanprobe names the op and the fix
    python examples/train_wgan_gp.py --on-nan dump --dump-dir nan-dumps
    python examples/train_wgan_gp.py --no-watch           # the same run without nanprobe

The critic is DCGAN-style, 15 convolutions deep at DCGAN's N(0, 0.02) init (configs/models.py), and
the gradient penalty is written as in most WGAN-GP code: inside autocast, with a hand-written sqrt
norm. Under fp16 its input gradients flush to zero and the penalty's backward is NaN in the first
critic steps; the same loop in fp32 or bf16 trains.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
from models import DCGANCritic, DCGANGenerator  # noqa: E402

LATENT, IMG, BATCH, N_CRITIC = 64, 32, 8, 5
CRITIC_ARGS = {"img": IMG, "ch": 32, "extra": 4, "init_std": 0.02}
GENERATOR_ARGS = {"latent_dim": LATENT, "img": IMG}


def blobs(n: int = 256, seed: int = 0) -> TensorDataset:
    """A generated data set: n images in [-1, 1] of one coloured disc on a dark background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, IMG), torch.linspace(-1, 1, IMG), indexing="ij")
    centre = torch.rand(n, 2, 1, 1, generator=g) * 1.2 - 0.6
    radius = torch.rand(n, 1, 1, generator=g) * 0.3 + 0.2
    colour = torch.rand(n, 3, 1, 1, generator=g) * 2 - 1
    inside = (((xx - centre[:, 0]) ** 2 + (yy - centre[:, 1]) ** 2).sqrt() < radius).float().unsqueeze(1)
    return TensorDataset(inside * colour + (1 - inside) * -0.8)


def critic_loss(critic, generator, real, z, lambda_gp: float = 10.0):
    """Wasserstein loss plus gradient penalty, as most WGAN-GP code writes it."""
    with torch.no_grad():
        fake = generator(z)
    real_score = critic(real).mean()
    fake_score = critic(fake).mean()
    epsilon = torch.rand(real.size(0), 1, 1, 1, device=real.device)
    interpolated = (epsilon * real + (1 - epsilon) * fake).requires_grad_(True)
    out = critic(interpolated)
    gradients = torch.autograd.grad(outputs=out, inputs=interpolated, grad_outputs=torch.ones_like(out),
                                    create_graph=True, retain_graph=True)[0].view(real.size(0), -1)
    grad_norm = torch.sqrt(torch.sum(gradients ** 2, dim=1))
    penalty = lambda_gp * torch.mean((grad_norm - 1) ** 2)
    return {"loss": fake_score - real_score + penalty, "penalty": penalty.detach()}


def train(steps: int = 20, dtype: torch.dtype = torch.float16, on_nan: str | None = "raise",
          dump_dir: str | None = None, log=print):
    """Train for `steps` critic steps (a generator step every N_CRITIC); returns (watch or None, losses)."""
    import nanprobe

    torch.manual_seed(0)
    device = "cpu"
    critic, generator = DCGANCritic(**CRITIC_ARGS), DCGANGenerator(**GENERATOR_ARGS)
    opt_d = torch.optim.Adam(critic.parameters(), lr=1e-4, betas=(0.0, 0.9))
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-4, betas=(0.0, 0.9))
    loader = DataLoader(blobs(), batch_size=BATCH, shuffle=True, drop_last=True)
    watch = None
    if on_nan is not None:
        watch = nanprobe.watch(critic, generator, opt_d, loss=critic_loss, on_nan=on_nan, dump_dir=dump_dir,
                               critic_args=CRITIC_ARGS, generator_args=GENERATOR_ARGS)
    def critic_step(real, z):  # the training step, unchanged
        opt_d.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            out = critic_loss(critic, generator, real, z)
        out["loss"].backward()
        opt_d.step()
        return out

    losses: list[float] = []
    step = 0
    while step < steps:
        for (real,) in loader:
            real = real.to(device)
            z = torch.randn(real.size(0), LATENT, device=device)
            out = watch.step(critic_step, real, z) if watch is not None else critic_step(real, z)
            losses.append(out["loss"].item())
            log(f"step {step}: critic loss {losses[-1]:.4g}, penalty {out['penalty'].item():.4g}")
            if step % N_CRITIC == N_CRITIC - 1:
                opt_g.zero_grad(set_to_none=True)
                with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                    g_loss = -critic(generator(torch.randn(BATCH, LATENT, device=device))).mean()
                g_loss.backward()
                opt_g.step()
            step += 1
            if step >= steps:
                break
    return watch, losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    parser.add_argument("--on-nan", choices=("raise", "warn", "dump"), default="raise")
    parser.add_argument("--dump-dir", default=None)
    parser.add_argument("--no-watch", action="store_true")
    args = parser.parse_args()
    import nanprobe

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    try:
        watch, _ = train(args.steps, dtype, None if args.no_watch else args.on_nan, args.dump_dir)
    except nanprobe.NonFiniteError as exc:
        print(exc, file=sys.stderr)
        return 1
    if watch is not None and watch.failure is not None:
        print(watch.failure.message, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
