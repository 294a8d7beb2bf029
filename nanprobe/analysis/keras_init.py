"""Initialisation of a Keras model: each kernel's std against the Glorot and He values for Keras's fans.

The same measure as nanprobe.analysis.initialisation for PyTorch modules, on Keras layers: a Conv*
or Dense kernel, the fans as keras.initializers computes them (the receptive field times the last two
axes), and the gain of the activation after it: the layer's own ``activation=``, or the next
activation layer (LeakyReLU, ReLU, Activation) with only shape-keeping layers between.
"""
from __future__ import annotations

import math

import torch

from nanprobe.io.keras import named_layers
from nanprobe.model.checks import InitCheck
from nanprobe.thresholds import ASSUMED_SLOPE, init_off_scale

_PASS_THROUGH = ("InputLayer", "Flatten", "Reshape", "Dropout", "SpatialDropout2D", "BatchNormalization",
                 "LayerNormalization", "GroupNormalization", "ZeroPadding2D", "Cropping2D", "AveragePooling2D",
                 "MaxPooling2D", "UpSampling2D", "Identity")


def _activation(layer) -> tuple[str, float] | None:
    """(name, gain) of an activation layer or a layer's own activation=, None when it is not one."""
    cls = type(layer).__name__
    if cls == "LeakyReLU":
        a = float(getattr(layer, "negative_slope", getattr(layer, "alpha", 0.3)))
        return f"leaky_relu({a:g})", math.sqrt(2.0 / (1 + a * a))
    if cls == "ReLU":
        a = float(getattr(layer, "negative_slope", 0.0) or 0.0)
        return (f"leaky_relu({a:g})", math.sqrt(2.0 / (1 + a * a))) if a else ("relu", math.sqrt(2.0))
    fn = getattr(layer, "activation", None)
    name = getattr(fn, "__name__", None)
    if cls == "Activation" or (name and name != "linear"):
        return {"relu": ("relu", math.sqrt(2.0)), "tanh": ("tanh", 5.0 / 3), "sigmoid": ("sigmoid", 1.0),
                "leaky_relu": ("leaky_relu(0.2)", math.sqrt(2.0 / 1.04)), "linear": ("linear", 1.0),
                "elu": ("elu", math.sqrt(2.0)), "gelu": ("gelu", math.sqrt(2.0)), "silu": ("silu", math.sqrt(2.0)),
                "swish": ("silu", math.sqrt(2.0))}.get(name or "", (name or "?", math.sqrt(2.0)))
    return None


def _following(order: list, i: int) -> tuple[str, float, bool]:
    own = _activation(order[i][1]) if type(order[i][1]).__name__ not in ("Activation", "LeakyReLU", "ReLU") else None
    if own is not None:
        return own + (False,)
    for _, layer in order[i + 1:]:
        act = _activation(layer)
        if act is not None:
            return act + (False,)
        if getattr(layer, "kernel", None) is not None or type(layer).__name__ not in _PASS_THROUGH:
            break
    else:
        return "linear", 1.0, False
    a = ASSUMED_SLOPE
    return f"leaky_relu({a:g})", math.sqrt(2.0 / (1 + a * a)), True


def _std(t) -> float | None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() < 2:
        return None
    x = t.detach().float()
    x = x[torch.isfinite(x)]
    s = float(x.std()) if x.numel() > 1 else math.nan
    return s if math.isfinite(s) else None


def check(model, batch: torch.Tensor | None = None, root: str = "critic") -> tuple[InitCheck, ...]:
    """An InitCheck per layer with a kernel (Conv*, Dense), in Keras's layer order, with Keras's fans."""
    order = [(p, layer) for p, layer in named_layers(model, root)[1:] if not layer._flatten_layers(include_self=False)]
    scales: dict[str, tuple] = {}
    if batch is not None:
        def hook(path):
            def record(layer, args, out):
                scales.setdefault(path, (_std(args[0]) if args else None, _std(out)))  # returns None: output kept

            return record

        handles = [layer.register_forward_hook(hook(path)) for path, layer in order
                   if getattr(layer, "kernel", None) is not None]
        try:
            with torch.no_grad():
                model(batch.float())
        except Exception:
            scales = {}  # the dry run and the replays report it
        finally:
            for h in handles:
                h.remove()
    out = []
    for i, (path, layer) in enumerate(order):
        kernel = getattr(layer, "kernel", None)
        if kernel is None or len(kernel.shape) < 2:
            continue
        w = torch.as_tensor(kernel.value).detach().float()
        std = float(w.std())
        if not math.isfinite(std) or std == 0:
            continue
        shape = tuple(kernel.shape)
        receptive = math.prod(shape[:-2])
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
        act, gain, assumed = _following(order, i)
        he = gain / math.sqrt(fan_in)
        ratio = std / he
        in_std, out_std = scales.get(path, (None, None))
        getter = root + "".join(f'.get_layer("{p}")' for p in path.split("/")[1:])
        draw = f"keras.initializers.HeNormal()({shape})"
        out.append(InitCheck(
            module=path, layer=type(layer).__name__, fan_in=fan_in, fan_out=fan_out, std=std,
            glorot=math.sqrt(2.0 / (fan_in + fan_out)), he=he, nonlinearity=act, assumed=assumed, ratio=ratio,
            input_std=in_std, output_std=out_std, flagged=init_off_scale(ratio),
            call=f"{getter}.kernel.assign({draw})   # or kernel_initializer=\"he_normal\" where you build it"))
    return tuple(out)
