"""The test suite's time with the emulated fp16/bf16 kernels (the default) and with the CPU's native ones
(as before they existed), run by hand (not a test):
python benchmarks/suite_time.py [--reps 1] [-k EXPR] [PYTEST PATHS...]   (default: tests/zoo tests/test_examples.py,
-k "not native_kernels": the zoo's own native-kernel comparison runs native kernels in both variants)

Each repetition runs pytest once per variant, in turn, in fresh processes, one torch thread each, and
prints the median wall time of each. The native variant loads benchmarks/native_kernels_plugin.py,
which makes every CPU replay use native kernels; tests asserting the emulated kernels fail there, so
only the time is compared.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(paths: list[str], native: bool, expr: str) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "-k", expr, *paths]
    if native:
        cmd[3:3] = ["-p", "benchmarks.native_kernels_plugin"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True).stdout
    summary = next((line for line in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed)", line)), "?")
    failed = [line.split(" ")[1] for line in out.splitlines() if line.startswith("FAILED ")]
    return time.perf_counter() - t, summary.strip("= ") + "".join(f"\n    failed: {f}" for f in failed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("-k", dest="expr", default="not native_kernels")
    ap.add_argument("paths", nargs="*", default=["tests/zoo", "tests/test_examples.py"])
    args = ap.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; "
          f"pytest -k {args.expr!r} {' '.join(args.paths)}")
    times: dict[str, list[float]] = {"emulated (now)": [], "native (before)": []}
    for _ in range(args.reps):
        for name in times:
            secs, summary = run(args.paths, native=name.startswith("native"), expr=args.expr)
            times[name].append(secs)
            print(f"  {name}: {secs:.0f} s ({summary})", flush=True)
    print("| kernels | median wall s |\n|---|---:|")
    for name, v in times.items():
        print(f"| {name} | {statistics.median(v):.0f} |")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
