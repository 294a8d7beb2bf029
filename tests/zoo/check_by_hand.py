"""Check a zoo case by hand: its step in plain PyTorch, fp32 against fp16/bf16, without nanprobe's probe.

    python tests/zoo/check_by_hand.py CASE [fp16] [bf16]    (BLACK=1: sample 2 is a black frame;
                                                             CONST=1: sample 2 is constant 0.5)

Low precision runs under CUDA's autocast lists (nanprobe's cuda_autocast, as `precision.policy: cuda`)
or, for `precision.mode: half`, with the models cast. It prints the loss and penalty, and per parameter
the gradient's norm-wise error against fp32, the share flushed to 0 and whether it is finite: the
numbers the zoo's expectations were decided from. A GradScaler is stood in for by a fixed scale
(SCALE, default 32768). The draws differ from nanprobe's replay; the mechanism does not.
"""
from __future__ import annotations

import copy
import importlib.util
import inspect
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from nanprobe.engine.autocast_policy import cuda_autocast, cuda_op_lists

CASES = Path(__file__).resolve().parent / "cases"
LOW = {"fp16": torch.float16, "bf16": torch.bfloat16}


def load(case: str, ref: str):
    sys.dont_write_bytecode = True  # never leave __pycache__ next to the cases
    file, name = ref.split(":")
    spec = importlib.util.spec_from_file_location(f"zoo_{case}", CASES / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def wgan_gp(D, G, real, z):
    fake = G(z).detach()
    alpha = torch.rand(real.shape[0], 1, 1, 1)
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)
    gp = 10 * ((torch.sqrt((grad.flatten(1) ** 2).sum(1)) - 1) ** 2).mean()
    return {"loss": D(fake).mean() - D(real).mean() + gp, "penalty": gp}


def hinge(D, G, real, z):
    fake = G(z).detach()
    return torch.relu(1 - D(real)).mean() + torch.relu(1 + D(fake)).mean()


class FixedScaler:
    """Stands in for GradScaler in a user's step: a constant scale."""

    def __init__(self, scale: float):
        self.value = scale

    def get_scale(self) -> float:
        return self.value

    def scale(self, x):
        return x * self.value


def main(case: str, dtypes: list[str]) -> None:
    doc = yaml.safe_load((CASES / f"{case}.yaml").read_text())
    model, data = doc["model"], doc["data"]
    torch.manual_seed(0)
    critic = load(case, model["critic"])(**model.get("critic_args", {}))
    generator = load(case, model["generator"])(**model.get("generator_args", {})) if "generator" in model else None
    lo, hi = data.get("range", [-1, 1])
    real = torch.rand(data["batch_size"], *data["shape"]) * (hi - lo) + lo
    latent = model.get("latent_dim", 8)
    z = torch.randn(data["batch_size"], *([latent] if isinstance(latent, int) else latent))
    if os.environ.get("BLACK"):
        real[2] = 0.0
    if os.environ.get("CONST"):
        real[2] = 0.5
    loss_doc = doc.get("loss", {})
    step = load(case, loss_doc["step"]) if "step" in loss_doc else hinge if loss_doc.get("kind") == "hinge" else wgan_gp
    half = doc.get("precision", {}).get("mode") == "half"
    scale = float(os.environ.get("SCALE", "32768")) if doc.get("train", {}).get("grad_scaler") else 1.0
    kwargs = {"scaler": FixedScaler(scale)} if "scaler" in inspect.signature(step).parameters else {}

    def run(dtype: str):
        torch.manual_seed(1)
        np.random.seed(1)
        random.seed(1)
        D, G, x, zz = copy.deepcopy(critic), copy.deepcopy(generator), real.clone(), z.clone()
        low = LOW.get(dtype)
        if half and low is not None:
            D, x, zz = D.to(low), x.to(low), zz.to(low)
            G = G.to(low) if G is not None else None
        ctx = cuda_autocast(low) if low is not None and not half else torch.autocast("cpu", enabled=False)
        with cuda_op_lists():
            with ctx:
                out = step(D, G, x, zz, **kwargs)
            loss = out["loss"] if isinstance(out, dict) else out
            (loss * scale).backward()
        values = out if isinstance(out, dict) else {"loss": out}
        grads = {n: p.grad.float() / scale for n, p in D.named_parameters() if p.grad is not None}
        return {k: float(v.detach().float()) if torch.is_tensor(v) else v for k, v in values.items()}, grads

    ref_values, ref_grads = run("fp32")
    print("fp32", ref_values)
    for dtype in dtypes:
        try:
            values, grads = run(dtype)
        except Exception as exc:  # e.g. binary_cross_entropy under autocast
            print(dtype, "raises", type(exc).__name__, str(exc).splitlines()[0][:120])
            continue
        print(dtype, values)
        for name, g in grads.items():
            g32 = ref_grads.get(name)
            if g32 is None:
                continue
            finite = bool(torch.isfinite(g).all())
            rel = float((g - g32).norm() / g32.norm()) if finite and g32.norm() > 0 else float("nan")
            zeroed = float(((g == 0) & (g32 != 0)).float().mean())
            print(f"   {name:28} |g32| {float(g32.norm()):.2e} rel {rel:.3g} zeroed {zeroed:.2f} finite {finite}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["fp16", "bf16"])
