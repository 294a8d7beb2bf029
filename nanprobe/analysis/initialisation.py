"""Initialisation: each weight layer's std against the Glorot and He values for its fans, and the
output scale it produces on a real batch.

The He value uses the gain of the nonlinearity that follows the layer in the forward pass
(the next activation module run after it); when a weight layer comes next instead (an activation
applied functionally), LeakyReLU(0.2) is assumed, as GAN critics use; after the last layer, linear.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from nanprobe.engine.reinit import WEIGHTED
from nanprobe.enums import Framework
from nanprobe.model.checks import InitCheck
from nanprobe.thresholds import ASSUMED_SLOPE, init_off_scale

_PASS_THROUGH = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.Dropout, nn.Identity,
                 nn.Flatten, nn.Unflatten, nn.AvgPool2d, nn.MaxPool2d, nn.Upsample)


def _fans(w: torch.Tensor) -> tuple[int, int]:
    # The same convention as nn.init, so the suggested kaiming_normal_ call gives exactly `he`.
    receptive = w[0][0].numel() if w.dim() > 2 else 1
    return w.size(1) * receptive, w.size(0) * receptive


def _activation(m: nn.Module) -> tuple[str, float, str] | None:
    """(name for the report, gain, kaiming arguments) of an activation module, None if it is not one."""
    if isinstance(m, nn.LeakyReLU):
        a = m.negative_slope
        return f"leaky_relu({a:g})", nn.init.calculate_gain("leaky_relu", a), f"a={a:g}"
    if isinstance(m, (nn.ReLU, nn.ReLU6)):
        return "relu", math.sqrt(2.0), 'nonlinearity="relu"'
    if isinstance(m, nn.Tanh):
        return "tanh", 5.0 / 3, 'nonlinearity="tanh"'
    if isinstance(m, (nn.Sigmoid, nn.SiLU, nn.GELU, nn.ELU)):
        # nn.init has no gain for SiLU/GELU/ELU; ReLU's is the usual stand-in.
        relu_like = not isinstance(m, nn.Sigmoid)
        return (type(m).__name__.lower(), math.sqrt(2.0) if relu_like else 1.0,
                'nonlinearity="relu"' if relu_like else 'nonlinearity="sigmoid"')
    return None


def _following(order: list[tuple[str, nn.Module]], i: int) -> tuple[str, float, str, bool]:
    for _, m in order[i + 1:]:
        act = _activation(m)
        if act is not None:
            return act + (False,)
        if isinstance(m, WEIGHTED):
            break
        if not isinstance(m, _PASS_THROUGH):
            break
    else:
        return "linear", 1.0, 'nonlinearity="linear"', False
    a = ASSUMED_SLOPE
    return f"leaky_relu({a:g})", nn.init.calculate_gain("leaky_relu", a), f"a={a:g}", True


def _attr(path: str) -> str:
    parts = path.split(".")
    return parts[0] + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in parts[1:])


def _std(t) -> float | None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() < 2:
        return None
    x = t.detach().float()
    s = float(x.std())
    if math.isfinite(s):
        return s  # every value is finite (one inf or NaN makes the std NaN): no mask to build
    finite = torch.isfinite(x)
    x = x[finite]  # a NaN sample in the batch must not hide the scale of the others
    s = float(x.std()) if x.numel() > 1 else math.nan
    return s if math.isfinite(s) else None


def _run(model: nn.Module, batch: torch.Tensor | None) -> tuple[list[tuple[str, nn.Module]], dict]:
    """Leaf modules in execution order and (input std, output std) of each, from one fp32 forward."""
    leaves = {m: name for name, m in model.named_modules() if not list(m.children())}
    if batch is None:
        return [(n, m) for m, n in leaves.items()], {}
    order: list[tuple[str, nn.Module]] = []
    scales: dict[str, tuple] = {}

    def hook(m, args, out):
        name = leaves[m]
        order.append((name, m))
        if isinstance(m, WEIGHTED) and name not in scales:
            scales[name] = (_std(args[0]) if args else None, _std(out))

    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    # The replay runs in train mode; batch norm then updates its running stats, which must not change.
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    try:
        model.train()
        with torch.no_grad():
            model(batch.float())
    except Exception:
        order, scales = [(n, m) for m, n in leaves.items()], {}  # the dry run and replays report it
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
    return order, scales


def check(model: nn.Module, batch: torch.Tensor | None = None, root: str = "critic",
          framework: Framework = Framework.TORCH) -> tuple[InitCheck, ...]:
    """An InitCheck per Conv/ConvTranspose/Linear layer, in execution order (module order if not run);
    for a Keras model, per layer with a kernel (nanprobe.analysis.keras_init)."""
    if framework is Framework.KERAS:
        from nanprobe.analysis import keras_init

        return keras_init.check(model, batch, root)
    order, scales = _run(model, batch)
    out = []
    seen = set()
    for i, (name, m) in enumerate(order):
        w = getattr(m, "weight", None)
        if not isinstance(m, WEIGHTED) or name in seen or not isinstance(w, torch.Tensor) or w.numel() < 2:
            continue
        seen.add(name)
        with torch.no_grad():
            std = float(w.detach().float().std())
        if not math.isfinite(std) or std == 0:
            continue
        fan_in, fan_out = _fans(w)
        act, gain, kw, assumed = _following(order, i)
        he = gain / math.sqrt(fan_in)
        ratio = std / he
        path = f"{root}.{name}" if name else root
        in_std, out_std = scales.get(name, (None, None))
        out.append(InitCheck(
            module=path, layer=type(m).__name__, fan_in=fan_in, fan_out=fan_out, std=std,
            glorot=math.sqrt(2.0 / (fan_in + fan_out)), he=he, nonlinearity=act, assumed=assumed, ratio=ratio,
            input_std=in_std, output_std=out_std,
            flagged=init_off_scale(ratio),
            call=f"nn.init.kaiming_normal_({_attr(path)}.weight, {kw})"))
    return tuple(out)


def he_ratios(model: torch.nn.Module, root: str = "critic",
              checks: tuple[InitCheck, ...] | None = None) -> dict[str, float]:
    """Module path -> std of its weight / its He value, for layers with a weight matrix or kernel."""
    return {c.module: c.ratio for c in (checks if checks is not None else check(model, None, root))}
