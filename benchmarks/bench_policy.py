"""Cost of precision.policy: cuda on the CPU, run by hand (not a test): python benchmarks/bench_policy.py

Replays one shipped example (default configs/wgan_gp_fp16_underflow.yaml) in one low precision
with policy cuda and with policy native, interleaved, median of --reps repetitions, with the
probe (what `diagnose` runs) and without it (the plain step), and prints both times and the ratio:
wall-clock, and the process's CPU time (all threads), which a machine shared with other jobs skews less.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "configs/wgan_gp_fp16_underflow.yaml"))
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16"])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    import torch

    from nanprobe.engine.replay import replay
    from nanprobe.enums import Precision
    from nanprobe.io import config as cfg
    from nanprobe.io import loading

    base = cfg.with_overrides(cfg.load(args.config), device="cpu")
    loaded = loading.load(base)
    precision = Precision(args.precision)
    cpu = torch.device("cpu")
    print(f"{Path(args.config).name}, {precision.value}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.reps}")
    for probe in (False, True):
        runs = {policy: cfg.with_overrides(base, policy=policy) for policy in ("native", "cuda")}
        times: dict[str, list[float]] = {policy: [] for policy in runs}
        cpu_times: dict[str, list[float]] = {policy: [] for policy in runs}
        for config in runs.values():  # warm-up
            replay(config, loaded, precision, cpu, probe=probe)
        for _ in range(args.reps):
            for policy, config in runs.items():
                t, c = time.perf_counter(), time.process_time()
                replay(config, loaded, precision, cpu, probe=probe)
                times[policy].append(time.perf_counter() - t)
                cpu_times[policy].append(time.process_time() - c)
        for what, values in (("wall", times), ("cpu", cpu_times)):
            native, cuda = (statistics.median(values[p]) for p in ("native", "cuda"))
            print(f"{'diagnose replay (probe)' if probe else 'plain replay':24s} {what:4s} native {native:7.3f} s   "
                  f"cuda {cuda:7.3f} s   ratio {cuda / native:5.2f}x")


if __name__ == "__main__":
    main()
