"""Parameters the critic does not depend on: their exact gradient is 0, so every precision's is rounding noise.

A bias added just before a per-channel normalization is one (batch norm, instance norm, or a hand-written
`x - x.mean(dim=(2, 3), keepdim=True)`): the mean subtraction removes it. fp32 computes its gradient as
a sum that cancels to about 1e-8, a low precision to something a thousand times larger, and their
relative error is huge without meaning anything for training. The test is the mechanism itself: move
the parameter and see whether the critic's outputs move, in fp64, on real samples and on noise.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

from nanprobe import thresholds as th


def independent(critic: torch.nn.Module, batch: torch.Tensor | None, names: Iterable[str],
                root: str = "critic") -> frozenset[str]:
    """Those of `names` (root.path.to.param) the critic's outputs do not move with; empty when it cannot tell.

    Runs on an fp64 copy in training mode (batch statistics, as the replays); the caller's model, its
    buffers and every random generator are left as they were.
    """
    params = {f"{root}.{n}": n for n, _ in critic.named_parameters()}
    wanted = [n for n in dict.fromkeys(names) if n in params]
    if not wanted or batch is None or not batch.is_floating_point():
        return frozenset()
    try:
        return _independent(critic, batch, wanted, params)
    except Exception:  # a critic that cannot run in fp64, on this input or copied: no claim is made
        return frozenset()


def _independent(critic: torch.nn.Module, batch: torch.Tensor, wanted: list, params: dict) -> frozenset[str]:
    model = copy.deepcopy(critic).to(device="cpu", dtype=torch.float64).train()
    own = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    real = batch[:th.INDEPENDENT_SAMPLES].detach().to(device="cpu", dtype=torch.float64)
    lo, hi = float(real.min()), float(real.max())
    noise = torch.rand(real.shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    x = torch.cat([real, noise])

    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def run() -> torch.Tensor:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)  # the same dropout masks in every forward
            out = model(x)
            for k, v in model.named_buffers():
                v.copy_(buffers[k])  # spectral norm's power iteration and running stats start each forward alike
        if not isinstance(out, torch.Tensor):
            raise TypeError("the critic's output is not a tensor")
        return out.detach().to(torch.float64)

    base = run()
    scale = float(base.abs().max()) if base.numel() else 0.0
    if not bool(torch.isfinite(base).all()) or scale == 0.0:
        return frozenset()
    found = []
    for name in wanted:
        p = own[params[name]]
        if not p.is_floating_point() or p.numel() == 0:
            continue
        saved = p.detach().clone()
        step = torch.randn(p.shape, generator=gen, dtype=p.dtype) * (0.1 * max(float(saved.pow(2).mean().sqrt()), 1e-2))
        moves = []
        for k in (1.0, 2.0):
            with torch.no_grad():
                p.copy_(saved + k * step)
            moves.append(run() - base)
        with torch.no_grad():
            p.copy_(saved)
        once, twice = moves
        if not bool(torch.isfinite(once).all() and torch.isfinite(twice).all()):
            continue
        if float(once.abs().max()) > th.INDEPENDENT_CHANGE * scale:
            continue
        # Below that the output can still follow the parameter, in a critic whose activations dwarf it (a
        # bad init): a response that doubles when the step doubles is a dependence, rounding noise is not.
        size = float(torch.linalg.vector_norm(once))
        if size > 0 and float(torch.linalg.vector_norm(twice - 2 * once)) <= 0.5 * size:
            continue
        found.append(name)
    return frozenset(found)
