"""nanprobe.watch overhead, run by hand (not a test): python benchmarks/bench_watch.py [--reps 15] [--dtypes fp32,bf16]

The same WGAN-GP critic step (DCGAN-64 critic and generator from configs/models.py, batch 16, Adam,
the penalty written as in the example) timed plain and in three watched forms, interleaved (the
order rotates every repetition, so load from other processes hits all alike):
  check     `with w.step(real, z):` with loss= (the snapshot for a replay + the one-sync check; target <= 1.10)
  block     `with w:` and record=False (the one-sync check alone)
  recorder  `with w:` with no loss (the flight recorder on: every op's max |x| on the device; target <= 1.3)
Prints, per precision, the median step time of each, its ratio to the plain step's median, the
median of the per-repetition ratios, the ratio of CPU time (steadier than wall time on shared
cores), and the watch's own cost per step (snapshot + the one-sync check) in milliseconds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "configs"))

from models import DCGANCritic, DCGANGenerator  # noqa: E402

import nanprobe  # noqa: E402

IMG, BATCH, LATENT = 64, 16, 128
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def critic_loss(critic, generator, real, z, lambda_gp: float = 10.0):
    with torch.no_grad():
        fake = generator(z)
    loss = critic(fake).mean() - critic(real).mean()
    eps = torch.rand(real.size(0), 1, 1, 1)
    with torch.autocast("cpu", enabled=False):  # the penalty in fp32, so no precision makes this step NaN
        x = (eps * real + (1 - eps) * fake.float()).requires_grad_(True)
        out = critic(x)
        g = torch.autograd.grad(out, x, torch.ones_like(out), create_graph=True)[0].flatten(1)
        return loss.float() + lambda_gp * ((g.norm(2, dim=1) - 1) ** 2).mean()


def measure(precision: str, reps: int) -> dict:
    torch.manual_seed(0)
    critic = DCGANCritic(img=IMG, ch=64)
    generator = DCGANGenerator(latent_dim=LATENT, img=IMG, ch=64)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-4, betas=(0.0, 0.9))
    dtype = DTYPES[precision]
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    w = nanprobe.watch(critic, generator, opt, scaler, loss=critic_loss, on_nan="warn")
    w_block = nanprobe.watch(critic, generator, opt, scaler, record=False, on_nan="warn")
    w_rec = nanprobe.watch(critic, generator, opt, scaler, on_nan="warn")
    real = torch.rand(BATCH, 3, IMG, IMG) * 2 - 1

    def step():
        z = torch.randn(BATCH, LATENT)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=precision != "fp32"):
            loss = critic_loss(critic, generator, real, z)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss, z

    def watched():
        z = torch.randn(BATCH, LATENT)
        with w.step(real, z) as s:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype, enabled=precision != "fp32"):
                loss = critic_loss(critic, generator, real, z)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            s.loss = loss

    def around(watch):
        def run():
            with watch:
                step()
        return run

    variants = {"plain": step, "check": watched, "block": around(w_block), "recorder": around(w_rec)}

    def timed(fn) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t, time.process_time() - c

    for _ in range(2):  # warm-up: allocator, kernels, autocast caches, the watch's buffers
        for fn in variants.values():
            fn()
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    names = list(variants)
    for i in range(reps):
        # rotate the order, so a slow spell does not always land on the same variant
        for k in names[i % len(names):] + names[:i % len(names)]:
            t, c = timed(variants[k])
            wall[k].append(t)
            cpu[k].append(c)

    # The watch's own work, timed alone: the snapshot at entry and the one-sync check at exit.
    own = []
    z = torch.randn(BATCH, LATENT)
    for _ in range(max(reps, 20)):
        t = time.perf_counter()
        w._begin(real, z)
        w._end(None)
        own.append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in wall.items()}
    out = {"precision": precision, "plain_ms": 1e3 * med["plain"], "watch_own_ms": 1e3 * statistics.median(own),
           "failures": w.failures + w_block.failures + w_rec.failures, "recorded_ops": w_rec.flight.ops}
    for k in names[1:]:
        out[k] = {"ms": 1e3 * med[k], "ratio": med[k] / med["plain"],
                  "pair_ratio_median": statistics.median(a / b for a, b in zip(wall[k], wall["plain"])),
                  # CPU time of this process: less sensitive than wall time to other processes on shared cores
                  "cpu_ratio": statistics.median(cpu[k]) / statistics.median(cpu["plain"])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    n_params = sum(p.numel() for p in DCGANCritic(img=IMG, ch=64).parameters())
    print(f"DCGAN-{IMG} critic ({n_params / 1e6:.2f}M parameters) and generator, batch {BATCH}, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.reps} repetitions", file=sys.stderr)
    if not args.json:
        print(f"{'precision':<10}{'variant':<10}{'ms':>9}{'ratio':>8}{'pair ratio':>12}{'CPU ratio':>11}", flush=True)
    results = []
    for p in (p.strip() for p in args.dtypes.split(",") if p.strip()):
        r = measure(p, args.reps)
        results.append(r)
        if not args.json:
            print(f"{r['precision']:<10}{'plain':<10}{r['plain_ms']:>9.1f}", flush=True)
            for k in ("check", "block", "recorder"):
                v = r[k]
                print(f"{'':<10}{k:<10}{v['ms']:>9.1f}{v['ratio']:>8.3f}{v['pair_ratio_median']:>12.3f}"
                      f"{v['cpu_ratio']:>11.3f}", flush=True)
            print(f"{'':<10}watch's own work (snapshot + check): {r['watch_own_ms']:.2f} ms; "
                  f"{r['recorded_ops']} op outputs recorded per step", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
