"""What --verify-fix costs, run by hand (not a test): python benchmarks/bench_verify_fix.py [CONFIG ...] [--reps 3]

For each config (default: every configs/*.yaml), in this one process: the median wall time of a
plain `diagnose`, of `diagnose --verify-fix`, their ratio, how many extra replays the verification
ran, and each verified fix. Times include loading; run it on a quiet machine.
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

    times, report, replays = [], None, 0
    for _ in range(reps):
        steps = []
        t = time.perf_counter()
        report = nanprobe.diagnose(path, verify_fix=verify, progress=lambda p, s, n: steps.append((p, s)))
        times.append(time.perf_counter() - t)
        replays = sum(1 for p, s in steps if s == 0 and isinstance(p, str))  # verification replays pass a label
    return statistics.median(times), report, replays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", type=Path)
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    configs = args.configs or sorted((ROOT / "configs").glob("*.yaml"))
    print(f"{'config':32} {'plain s':>8} {'verify s':>9} {'ratio':>6} {'replays':>8}  fixes (✓ verified, ✗ failed, ? not replayed)")
    for path in configs:
        plain, _, _ = _timed(path, False, args.reps)
        verify, report, replays = _timed(path, True, args.reps)
        marks = {True: "✓", False: "✗", None: "?"}
        fixes = "; ".join(f"{r.precision.value}: " + ", ".join(f"{marks[f.verified]}{f.id}" for f in r.fixes)
                          for r in report.runs if r.fixes) or "-"
        print(f"{path.name:32} {plain:8.1f} {verify:9.1f} {verify / plain:6.2f} {replays:8d}  {fixes}", flush=True)


if __name__ == "__main__":
    main()
