"""What --verify-fix costs, run by hand (not a test): python benchmarks/bench_verify_fix.py [CONFIG ...] [--reps 3]

For each config (default: every configs/*.yaml), in this one process: the median wall and CPU time
(this process, all its threads) of a plain `diagnose` and of `diagnose --verify-fix`, the ratios, how
many extra replays the verification ran, and each fix's verdict. Times include loading. CPU time is
the figure to trust on a shared machine; wall time only on a quiet one.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed(path: Path, verify: bool, reps: int):
    import nanprobe

    walls, cpus, report, replays = [], [], None, 0
    for _ in range(reps):
        steps = []
        t, c = time.perf_counter(), time.process_time()
        report = nanprobe.diagnose(path, verify_fix=verify, progress=lambda p, s, n: steps.append((p, s)))
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        replays = sum(1 for p, s in steps if s == 0 and " + " in str(p))  # verification replays pass "fp16 + fix"
    return statistics.median(walls), statistics.median(cpus), report, replays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", type=Path)
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    configs = args.configs or sorted((ROOT / "configs").glob("*.yaml"))
    print(f"{'config':30} {'wall s':>13} {'ratio':>5} {'cpu s':>13} {'ratio':>5} {'replays':>7}  "
          "fixes (✓ verified, ✗ failed, ? not replayed)")
    for path in configs:
        wall0, cpu0, _, _ = _timed(path, False, args.reps)
        wall1, cpu1, report, replays = _timed(path, True, args.reps)
        marks = {True: "✓", False: "✗", None: "?"}
        fixes = "; ".join(f"{r.precision.value}: " + ", ".join(f"{marks[f.verified]}{f.id}" for f in r.fixes)
                          for r in report.runs if r.fixes) or "-"
        print(f"{path.name:30} {wall0:6.1f}>{wall1:6.1f} {wall1 / wall0:5.2f} {cpu0:6.1f}>{cpu1:6.1f} "
              f"{cpu1 / cpu0:5.2f} {replays:7d}  {fixes}", flush=True)


if __name__ == "__main__":
    main()
