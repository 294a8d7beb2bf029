"""nanprobe benchmarks, run by hand (not a test): python benchmarks/bench_probe.py [--reps 5]

Prints, each as a ratio measured in this one process (median of --reps repetitions):
- probe overhead: one instrumented critic step against the same step without instrumentation,
  same precision, DCGAN-64 critic and generator at batch 16; and torch.autograd.detect_anomaly
  (check_nan=True) on the same step, the tool users reach for today;
- a whole diagnose (fp32, fp16, bf16 with the probe and the analysis) against the plain replay
  of the same three precisions;
- peak memory (max RSS, each variant in a fresh subprocess) of diagnose against the plain replay;
- start-up time of `nanprobe --help`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = {
    "model": {"critic": str(ROOT / "configs/models.py") + ":DCGANCritic", "critic_args": {"img": 64, "ch": 64},
              "generator": str(ROOT / "configs/models.py") + ":DCGANGenerator",
              "generator_args": {"latent_dim": 128, "img": 64, "ch": 64}, "latent_dim": [128]},
    "data": {"shape": [3, 64, 64], "batch_size": 16},
    "loss": {"kind": "wgan-gp", "gp_precision": "fp32"},
    "train": {"grad_scaler": True},
    "device": "cpu",
}


def _setup(dtypes=("fp32",)):
    from nanprobe.io import config as cfg
    from nanprobe.io import loading
    config = cfg.with_overrides(cfg.from_dict(CONFIG), dtypes=list(dtypes))
    return config, loading.load(config)


def interleaved(fns: dict, reps: int) -> dict:
    """Median seconds of each function, run in turn every repetition so a change of load hits them alike."""
    for fn in fns.values():
        fn()  # warm-up: allocator, kernels, autocast caches
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def overhead(reps: int, precision_name: str) -> dict:
    import warnings

    import torch

    from nanprobe.engine.replay import replay
    from nanprobe.enums import Precision

    config, loaded = _setup()
    p = Precision(precision_name)
    dev = torch.device("cpu")
    warnings.filterwarnings("ignore")

    def anomaly():
        with torch.autograd.detect_anomaly(check_nan=True):
            replay(config, loaded, p, dev, probe=False)

    t = interleaved({"plain": lambda: replay(config, loaded, p, dev, probe=False),
                      "probe": lambda: replay(config, loaded, p, dev, probe=True), "anomaly": anomaly}, reps)
    return {"precision": precision_name, "plain_s": t["plain"], "probe_s": t["probe"],
            "probe_ratio": t["probe"] / t["plain"], "detect_anomaly_s": t["anomaly"],
            "detect_anomaly_ratio": t["anomaly"] / t["plain"]}


def whole(reps: int) -> dict:
    import torch

    from nanprobe import api
    from nanprobe.engine.replay import replay
    from nanprobe.enums import Precision

    config, loaded = _setup(("fp32", "fp16", "bf16"))
    dev = torch.device("cpu")
    order = [Precision.FP32, Precision.FP16, Precision.BF16]
    t = interleaved({"plain": lambda: [replay(config, loaded, p, dev, probe=False) for p in order],
                      "diagnose": lambda: api.diagnose(config)}, reps)
    return {"plain_three_s": t["plain"], "diagnose_s": t["diagnose"], "diagnose_ratio": t["diagnose"] / t["plain"]}


_MEM = """
import resource, sys, json
sys.path.insert(0, {root!r})
sys.argv = ['x']
import benchmarks.bench_probe as b
import torch
from nanprobe.enums import Precision
from nanprobe.engine.replay import replay
from nanprobe import api
config, loaded = b._setup(("fp32", "fp16", "bf16"))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if {which!r} == "plain":
    for p in (Precision.FP32, Precision.FP16, Precision.BF16):
        replay(config, loaded, p, torch.device("cpu"), probe=False)
else:
    api.diagnose(config)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"base_mb": base / 1024, "peak_mb": peak / 1024}}))
"""


def memory() -> dict:
    out = {}
    for which in ("plain", "diagnose"):
        code = _MEM.format(root=str(ROOT), which=which)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out[which] = json.loads(res.stdout.strip().splitlines()[-1])
    grow = lambda w: out[w]["peak_mb"] - out[w]["base_mb"]  # noqa: E731
    out["ratio_peak_rss"] = out["diagnose"]["peak_mb"] / out["plain"]["peak_mb"]
    out["ratio_growth"] = grow("diagnose") / max(grow("plain"), 1e-9)
    return out


def startup(reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "nanprobe", "--help"], capture_output=True, check=True, cwd=ROOT)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    import platform

    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    for p in ("fp32", "bf16"):
        r = overhead(args.reps, p)
        print(f"probe overhead ({p}, DCGAN-64, batch 16, 1 critic step): plain {r['plain_s']:.3f}s, "
              f"probe {r['probe_s']:.3f}s = {r['probe_ratio']:.2f}x; detect_anomaly {r['detect_anomaly_s']:.3f}s "
              f"= {r['detect_anomaly_ratio']:.2f}x")
    w = whole(max(1, args.reps // 2))
    print(f"diagnose of fp32+fp16+bf16: {w['diagnose_s']:.2f}s vs plain replay of the same {w['plain_three_s']:.2f}s "
          f"= {w['diagnose_ratio']:.2f}x")
    m = memory()
    print(f"peak RSS: plain {m['plain']['peak_mb']:.0f} MB, diagnose {m['diagnose']['peak_mb']:.0f} MB "
          f"= {m['ratio_peak_rss']:.2f}x (growth over the loaded process: {m['ratio_growth']:.2f}x)")
    print(f"start-up: nanprobe --help {startup(5) * 1000:.0f} ms (median of 5)")


if __name__ == "__main__":
    main()
