"""One statistics row, C scan against torch ops, run by hand (not a test): python benchmarks/bench_rows.py [--reps 7]

Times `stats.host_row` (nanprobe's C scan, `nanprobe/engine/_rowstats.c`) against `stats.torch_row`
(the torch ops it replaces) on one thread, per dtype, size and kind of values: all normal (the fast
path), and with exact zeros and subnormals (a ReLU output, an fp16 gradient that underflows). Each
repetition times both in turn, each over enough calls to take about 20 ms; prints the medians in
microseconds per call and checks that both give the same row.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _values(dtype, n: int, kind: str):
    import torch

    x = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(dtype)
    if kind == "zeros+subnormals":
        x = torch.relu(x)
        x[::7] = torch.finfo(dtype).smallest_normal / 4
    return x


def _per_call(fn, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    import torch

    from nanprobe.engine import stats

    torch.set_num_threads(1)
    if not stats.has_c_scan():
        sys.exit("the C scan is not built (pip install -e . with a C compiler): nothing to compare")
    print(f"torch {torch.__version__}, 1 thread, medians of {args.reps} interleaved repetitions, us per call")
    print("| dtype | values | kind | torch ops | C scan | x faster |\n|---|---:|---|---:|---:|---:|")
    scratch = stats.Scratch()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n in (100, 284_388, 2_000_000):
            for kind in ("normal", "zeros+subnormals"):
                x = _values(dtype, n, kind)
                assert stats.host_row(x, scratch) == stats.torch_row(x, scratch)
                calls = max(3, int(20_000 / max(1.0, _per_call(lambda x=x: stats.torch_row(x, scratch), 3))))
                ops, scan = [], []
                for _ in range(args.reps):
                    ops.append(_per_call(lambda x=x: stats.torch_row(x, scratch), calls))
                    scan.append(_per_call(lambda x=x: stats.host_row(x, scratch), calls))
                a, b = statistics.median(ops), statistics.median(scan)
                name = str(dtype).replace("torch.", "")
                print(f"| {name} | {n:,} | {kind} | {a:.1f} | {b:.1f} | {a / b:.1f} |")


if __name__ == "__main__":
    main()
