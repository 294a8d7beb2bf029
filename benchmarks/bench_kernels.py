"""Emulated against native fp16/bf16 kernels, run by hand (not a test):
python benchmarks/bench_kernels.py [--reps 5] [--threads 1]

Prints the medians of interleaved runs (each repetition runs every variant once, in turn, so a
change of load on a shared machine hits them alike):
- one DCGAN-64 critic step with its gradient penalty at batch 16 (bench_probe's model, no probe,
  no GradScaler), in fp32, fp16 and bf16 autocast (CUDA's op lists) with emulated and with native
  kernels, each as a ratio to the fp32 step (target: emulated at most 1.3x);
- a whole three-precision `diagnose` (probe and analysis included) against one plain fp32 replay
  of the same step (target: at most 4x).

--threads sets torch's intra-op threads (default 1): on a machine other jobs share, a second
OpenMP thread waits for a core at every parallel region and the timings say more about the
scheduler than about the kernels.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_probe import CONFIG, _interleaved  # noqa: E402

STEP = {**CONFIG, "train": {"steps": 1, "grad_scaler": False}, "loss": {"kind": "wgan-gp", "gp_precision": "autocast"}}


def _configs():
    from nanprobe.io import config as cfg
    from nanprobe.io import loading

    config = cfg.from_dict(STEP)
    native = cfg.with_overrides(config, kernels="native")
    return config, native, loading.load(config)


def step_times(reps: int) -> dict:
    import torch

    from nanprobe.engine.replay import replay
    from nanprobe.enums import Precision

    emulated, native, loaded = _configs()
    dev = torch.device("cpu")
    fp32, fp16, bf16 = Precision.FP32, Precision.FP16, Precision.BF16
    return _interleaved({
        "fp32": lambda: replay(emulated, loaded, fp32, dev, probe=False),
        "fp16 emulated": lambda: replay(emulated, loaded, fp16, dev, probe=False),
        "bf16 emulated": lambda: replay(emulated, loaded, bf16, dev, probe=False),
        "fp16 native": lambda: replay(native, loaded, fp16, dev, probe=False),
        "bf16 native": lambda: replay(native, loaded, bf16, dev, probe=False),
    }, reps)


def whole(reps: int) -> dict:
    import torch

    from nanprobe import api
    from nanprobe.engine.replay import replay
    from nanprobe.enums import Precision

    emulated, native, loaded = _configs()
    return _interleaved({
        "plain fp32 replay": lambda: replay(emulated, loaded, Precision.FP32, torch.device("cpu"), probe=False),
        "diagnose fp32+fp16+bf16 (emulated)": lambda: api.diagnose(emulated),
    }, reps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start, "
          f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}; medians of {args.reps} interleaved runs")
    t = step_times(args.reps)
    print("\nDCGAN-64 critic step + gradient penalty, batch 16, autocast (cuda op lists), no probe:")
    print(f"| {'variant':<14} | {'median s':>8} | {'x fp32':>6} |\n|{'-' * 16}|{'-' * 10}:|{'-' * 8}:|")
    for k, v in t.items():
        print(f"| {k:<14} | {v:>8.3f} | {v / t['fp32']:>6.2f} |")
    w = whole(max(1, args.reps // 2 + 1))
    plain, diag = w["plain fp32 replay"], w["diagnose fp32+fp16+bf16 (emulated)"]
    print(f"\nwhole diagnose (fp32+fp16+bf16, emulated, probe and analysis): {diag:.2f}s vs one plain fp32 replay "
          f"{plain:.3f}s = {diag / plain:.2f}x")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
