"""What a Keras replay costs against a PyTorch one of the same size, run by hand (not a test):

    python benchmarks/bench_keras.py [--reps 5]

The same DCGAN-style WGAN-GP critic (configs/models.py:DCGANCritic against
configs/keras_models.py:dcgan_critic: strided 4x4 convs, LeakyReLU(0.2), a 3x3 conv per stage, the
same shapes; the Keras one is channels-last and has zero biases), one critic step at batch 16,
--img sized images (32 by default), on the CPU, with the config's default (emulated) kernels.
Medians of --reps interleaved repetitions, in this one process:

- the replay with the probe (what `nanprobe diagnose` runs per precision) and without it, in fp32
  and fp16 (PyTorch: CUDA-list autocast; Keras: the mixed_float16 policy), Keras over PyTorch;
- loading (building the models; for Keras also the first import of keras, in a fresh subprocess).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARGS = {"img": 32, "ch": 32, "extra": 1, "init_std": 0.02}


def config(framework: str):
    from nanprobe.io import config as cfg

    critic = "keras_models.py:dcgan_critic" if framework == "keras" else "models.py:DCGANCritic"
    raw = {"model": {"critic": critic, "critic_args": ARGS},
           "data": {"shape": [ARGS["img"], ARGS["img"], 3] if framework == "keras" else [3, ARGS["img"], ARGS["img"]],
                    "batch_size": 16},
           "loss": {"kind": "wgan-gp"}, "train": {"steps": 1}, "device": "cpu"}
    return cfg.from_dict(raw, base_dir=ROOT / "configs")


def replays(reps: int) -> dict:
    import torch

    from benchmarks.bench_probe import interleaved
    from nanprobe.engine.replay import replay
    from nanprobe.enums import Precision
    from nanprobe.io import loading

    warnings.filterwarnings("ignore")
    dev = torch.device("cpu")
    setups = {fw: (config(fw), None) for fw in ("torch", "keras")}
    setups = {fw: (c, loading.load(c)) for fw, (c, _) in setups.items()}
    fns = {}
    for fw, (c, loaded) in setups.items():
        for p in (Precision.FP32, Precision.FP16):
            for probe in (False, True):
                fns[(fw, p.value, probe)] = (lambda c=c, ld=loaded, p=p, probe=probe:
                                             replay(c, ld, p, dev, probe=probe))
    t = interleaved(fns, reps)
    print(json.dumps({" ".join(map(str, k)): round(v, 3) for k, v in t.items()}), flush=True)
    out = {}
    for p in ("fp32", "fp16"):
        for probe in (False, True):
            k, tt = t[("keras", p, probe)], t[("torch", p, probe)]
            out[f"{p} {'probe' if probe else 'plain'}"] = {"torch_s": round(tt, 3), "keras_s": round(k, 3),
                                                          "keras_over_torch": round(k / tt, 2)}
    return out


def loading_cost(reps: int) -> dict:
    code = ("import sys, time; sys.path.insert(0, {root!r}); t = time.perf_counter(); "
            "from benchmarks.bench_keras import config; from nanprobe.io import loading; "
            "loading.load(config({fw!r})); print(time.perf_counter() - t)")
    times = {"torch": [], "keras": []}
    for _ in range(reps):
        for fw in times:
            out = subprocess.run([sys.executable, "-W", "ignore", "-c", code.format(root=str(ROOT), fw=fw)],
                                 capture_output=True, text=True, check=True, timeout=600)
            times[fw].append(float(out.stdout.strip().splitlines()[-1]))
    return {f"load_{fw}_s": round(statistics.median(v), 2) for fw, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--img", type=int, default=ARGS["img"])
    args = ap.parse_args()
    ARGS["img"] = args.img
    result = {"reps": args.reps, "critic": ARGS, "batch": 16, "replays": replays(args.reps)}
    print(json.dumps(result, indent=2), flush=True)
    print(json.dumps(loading_cost(max(1, args.reps // 2))), flush=True)


if __name__ == "__main__":
    main()
