"""What --verify-fix costs, run by hand (not a test): python benchmarks/bench_verify_fix.py [CONFIG ...] [--reps 3]

For each config (default: every configs/*.yaml), in this one process: the median wall and CPU time
(this process, all its threads) of a plain `diagnose` and of `diagnose --verify-fix`, the ratios, how
many extra replays the verification ran (and how many of them ran patched copies of the user's code,
which also re-imports and re-builds their models), and each fix's verdict. Times include loading.
CPU time is the figure to trust on a shared machine; wall time only on a quiet one.
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

    walls, cpus, report, replays, patched = [], [], None, 0, 0
    for _ in range(reps):
        steps = []
        t, c = time.perf_counter(), time.process_time()
        report = nanprobe.diagnose(path, verify_fix=verify, progress=lambda p, s, n, steps=steps: steps.append((p, s)))
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        replays = sum(1 for p, s in steps if s == 0 and " + " in str(p))  # verification replays pass "fp16 + fix"
        patched = sum(1 for p, s in steps if s == 0 and str(p).endswith("(patched)"))
    return statistics.median(walls), statistics.median(cpus), report, (replays, patched)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", type=Path)
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    configs = args.configs or sorted((ROOT / "configs").glob("*.yaml"))
    print(f"{'config':30} {'wall s':>13} {'ratio':>5} {'cpu s':>13} {'ratio':>5} {'replays':>7} {'patched':>7}  "
          "fixes (✓ ok, ~ improves, ✗ fails, ? not replayed; * replayed as a patch of your code)")
    marks = {"ok": "✓", "improves": "~", "fails": "✗", "untried": "?", None: "?"}
    for path in configs:
        wall0, cpu0, _, _ = _timed(path, False, args.reps)
        wall1, cpu1, report, (replays, patched) = _timed(path, True, args.reps)

        def mark(f):
            star = "*" if f.patch and (f.verification or "").startswith("with the patch") else ""
            return f"{marks[f.check.value if f.check else None]}{f.id}{star}"

        fixes = "; ".join(f"{r.precision.value}: " + ", ".join(mark(f) for f in r.fixes)
                          for r in report.runs if r.fixes) or "-"
        print(f"{path.name:30} {wall0:6.1f}>{wall1:6.1f} {wall1 / wall0:5.2f} {cpu0:6.1f}>{cpu1:6.1f} "
              f"{cpu1 / cpu0:5.2f} {replays:7d} {patched:7d}  {fixes}", flush=True)


if __name__ == "__main__":
    main()
