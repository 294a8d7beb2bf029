"""nanprobe.watch overhead, run by hand (not a test): python benchmarks/bench_watch.py [--reps 15] [--dtypes fp32,bf16]

The same WGAN-GP critic step (DCGAN-64 critic and generator from configs/models.py, batch 16, Adam,
the penalty written as in the example) timed with and without `with w.step(real, z):` around it,
alternating the two every repetition so that load from other processes hits both alike. Prints,
per precision, the median step time of each, their ratio (target <= 1.10), the spread of the
per-pair ratios, the ratio of CPU time (steadier than wall time on shared cores), and the watch's own cost per step (snapshot + the one-sync check) in milliseconds.
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

import nanprobe  # noqa: E402
from models import DCGANCritic, DCGANGenerator  # noqa: E402

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

    def timed(fn) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t, time.process_time() - c

    for _ in range(2):  # warm-up: allocator, kernels, autocast caches, the watch's buffers
        step()
        watched()
    plain, watch_t, ratios, cpu_plain, cpu_watch = [], [], [], [], []
    for i in range(reps):
        # alternate which goes first, so a slow spell does not always land on the same one
        a, b = (step, watched) if i % 2 == 0 else (watched, step)
        ta, tb = timed(a), timed(b)
        (tp, cp), (tw, cw) = (ta, tb) if a is step else (tb, ta)
        plain.append(tp)
        watch_t.append(tw)
        ratios.append(tw / tp)
        cpu_plain.append(cp)
        cpu_watch.append(cw)

    # The watch's own work, timed alone: the snapshot at entry and the one-sync check at exit.
    own = []
    z = torch.randn(BATCH, LATENT)
    for _ in range(max(reps, 20)):
        t = time.perf_counter()
        w._begin(real, z)
        w._end(None)
        own.append(time.perf_counter() - t)
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {"precision": precision, "plain_ms": 1e3 * statistics.median(plain), "watched_ms": 1e3 * statistics.median(watch_t),
            "ratio": statistics.median(watch_t) / statistics.median(plain), "pair_ratio_median": statistics.median(ratios),
            "pair_ratio_iqr": [q[0], q[2]], "watch_own_ms": 1e3 * statistics.median(own),
            # CPU time of this process: less sensitive than wall time to other processes on shared cores
            "cpu_ratio": statistics.median(cpu_watch) / statistics.median(cpu_plain), "failures": w.failures}


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
        print(f"{'precision':<10}{'plain ms':>10}{'watched ms':>12}{'ratio':>8}{'pair ratios (median, IQR)':>30}"
              f"{'CPU-time ratio':>16}{'watch own ms':>14}", flush=True)
    results = []
    for p in (p.strip() for p in args.dtypes.split(",") if p.strip()):
        r = measure(p, args.reps)
        results.append(r)
        if not args.json:
            iqr = f"{r['pair_ratio_median']:.3f} [{r['pair_ratio_iqr'][0]:.3f}, {r['pair_ratio_iqr'][1]:.3f}]"
            print(f"{r['precision']:<10}{r['plain_ms']:>10.1f}{r['watched_ms']:>12.1f}{r['ratio']:>8.3f}{iqr:>30}"
                  f"{r['cpu_ratio']:>16.3f}{r['watch_own_ms']:>14.2f}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
