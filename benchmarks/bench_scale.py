"""Scale benchmark, run by hand (not a test):
python benchmarks/bench_scale.py [--sizes 64 128 256] [--dtypes fp32 fp16 bf16] [--kernels emulated|native]

A StyleGAN2-sized critic (benchmarks/stylegan2_critic.py, about 24M parameters) at batch 4, one
WGAN-GP critic step, diagnosed in each precision. For each image size, in fresh subprocesses:
the plain replay of the same steps (no probe) and the whole `diagnose`, with wall time and peak
RSS of each, so the growth of both can be read against the plain step's cost. --kernels sets
precision.kernels for both (default emulated, nanprobe's default on the CPU: fp16/bf16 computed in
fp32 and rounded per op; native: the CPU's own fp16/bf16 kernels, about 20 times slower).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from nanprobe import api
from nanprobe.io import config as cfg, loading
from nanprobe.enums import Precision
from nanprobe.engine.replay import replay, resolve_device
doc = {doc!r}
from pathlib import Path
config = cfg.from_dict(doc, base_dir=Path({bench!r}))
loaded = loading.load(config)
params = sum(p.numel() for p in loaded.critic.parameters())
device = resolve_device("cpu")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if {which!r} == "plain":
    order = [Precision.FP32] + [Precision(d) for d in doc["precision"]["dtypes"] if d != "fp32"]
    for p in order:
        replay(config, loaded, p, device, probe=False)
    verdicts = notes = None
else:
    report = api.diagnose(config)
    verdicts = {{r.precision.value: r.status.value for r in report.runs}}
    notes = {{r.precision.value: list(r.notes) for r in report.runs}}
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"wall_s": wall, "base_mb": base / 1024, "peak_mb": peak / 1024, "params": params,
                  "verdicts": verdicts, "notes": notes}}))
"""


def _doc(size: int, dtypes: list[str], kernels: str = "emulated") -> dict:
    return {
        "model": {"critic": "stylegan2_critic.py:StyleGAN2Critic", "critic_args": {"img": size}},
        "data": {"shape": [3, size, size], "batch_size": 4},
        "loss": {"kind": "wgan-gp"},
        "train": {"steps": 1},
        "precision": {"mode": "amp", "dtypes": dtypes, "kernels": kernels},
        "device": "cpu",
    }


def run(size: int, which: str, dtypes: list[str], kernels: str = "emulated") -> dict:
    code = _CHILD.format(root=str(ROOT), bench=str(ROOT / "benchmarks"), doc=_doc(size, dtypes, kernels), which=which)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{which} at {size}px failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "fp16", "bf16"])
    ap.add_argument("--kernels", choices=("emulated", "native"), default="emulated")
    ap.add_argument("--notes", action="store_true", help="print each precision's notes after its row")
    args = ap.parse_args()
    import os
    import platform

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; StyleGAN2-sized critic, batch 4, 1 WGAN-GP step, "
          f"precisions {', '.join(args.dtypes)}, {args.kernels} kernels, load average {os.getloadavg()[0]:.1f}")
    print(f"{'size':>5} {'params':>7} {'plain s':>8} {'diagnose s':>10} {'time x':>7} {'plain MB':>9} "
          f"{'diagnose MB':>11} {'mem x':>6} {'growth x':>8}  verdicts")
    for size in args.sizes:
        plain, diag = run(size, "plain", args.dtypes, args.kernels), run(size, "diagnose", args.dtypes, args.kernels)
        growth = (diag["peak_mb"] - diag["base_mb"]) / max(plain["peak_mb"] - plain["base_mb"], 1e-9)
        print(f"{size:>5} {plain['params'] / 1e6:>6.1f}M {plain['wall_s']:>8.1f} {diag['wall_s']:>10.1f} "
              f"{diag['wall_s'] / plain['wall_s']:>7.2f} {plain['peak_mb']:>9.0f} {diag['peak_mb']:>11.0f} "
              f"{diag['peak_mb'] / plain['peak_mb']:>6.2f} {growth:>8.2f}  {diag['verdicts']}", flush=True)
        if args.notes:
            for precision, notes in diag["notes"].items():
                for note in notes:
                    print(f"      {precision} note: {note}", flush=True)


if __name__ == "__main__":
    main()
