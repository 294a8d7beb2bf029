"""Emulated against native fp16/bf16 kernels, run by hand (not a test):
python benchmarks/bench_kernels.py [--reps 5] [--threads 1] [--only-whole] [--whole-steps 1 5]

Prints the medians (wall time and this process's CPU time) of interleaved runs (each repetition runs every variant once, in turn, so a
change of load on a shared machine hits them alike):
- one DCGAN-64 critic step with its gradient penalty at batch 16 (bench_probe's model, no probe,
  no GradScaler), in fp32, fp16 and bf16 autocast (CUDA's op lists) with emulated and with native
  kernels, each as a ratio to the fp32 step (target: emulated at most 1.3x);
- a whole three-precision `diagnose` (probe and analysis included) against one plain fp32 replay
  of the same steps (target: at most 4x), for one step and for diagnose's default of 5 steps
  (--whole-steps); --only-whole skips the per-step table (its native runs take most of the time).

--threads sets torch's intra-op threads (default 1): on a machine other jobs share, a second
OpenMP thread waits for a core at every parallel region and the timings say more about the
scheduler than about the kernels.
"""  # noqa: E501 (the module docstring is kept verbatim)
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_probe import CONFIG  # noqa: E402

STEP = {**CONFIG, "train": {"steps": 1, "grad_scaler": False}, "loss": {"kind": "wgan-gp", "gp_precision": "autocast"}}


def _interleaved(fns: dict, reps: int) -> dict:
    """{name: (median wall s, median CPU s)}, each function run in turn every repetition after one warm-up.

    CPU time (this process, all its threads) is what a busy machine distorts least: wall time
    there also counts the time the process waited for a core.
    """
    for fn in fns.values():
        fn()
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


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


def whole(reps: int, steps: int) -> dict:
    import torch

    from nanprobe import api
    from nanprobe.engine.replay import replay
    from nanprobe.enums import Precision
    from nanprobe.io import config as cfg

    emulated, _, loaded = _configs()
    emulated = cfg.with_overrides(emulated, steps=steps)
    return _interleaved({
        f"plain fp32 replay, {steps} step(s)": lambda: replay(emulated, loaded, Precision.FP32, torch.device("cpu"),
                                                              probe=False),
        f"diagnose fp32+fp16+bf16 (emulated), {steps} step(s)": lambda: api.diagnose(emulated),
    }, reps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--whole-steps", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--only-whole", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start, "
          f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}; "
          f"medians of {args.reps} interleaved runs")
    print("| variant | median wall s | x fp32 | median CPU s | x fp32 |\n|---|---:|---:|---:|---:|")
    if not args.only_whole:
        t = step_times(args.reps)
        print("DCGAN-64 critic step + gradient penalty, batch 16, autocast (cuda op lists), no probe:")
        for k, (wall, cpu) in t.items():
            print(f"| {k} | {wall:.3f} | {wall / t['fp32'][0]:.2f} | {cpu:.3f} | {cpu / t['fp32'][1]:.2f} |")
    for steps in args.whole_steps:
        w = whole(args.reps, steps)
        ref = next(iter(w.values()))
        for k, (wall, cpu) in w.items():
            print(f"| {k} | {wall:.3f} | {wall / ref[0]:.2f} | {cpu:.3f} | {cpu / ref[1]:.2f} |")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
