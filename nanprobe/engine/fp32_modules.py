"""precision.fp32_modules: named modules run outside autocast, on fp32 inputs, with fp32 weights.

The replay installs a wrapper on its own copies of the models and removes it on exit. In half
mode the modules keep fp32 weights and their outputs are cast back to the model's dtype, so the
next layer gets the dtype its weights have.
"""
from __future__ import annotations

import difflib
import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from nanprobe.errors import ConfigError

_MISSING = object()


def _torch_names(root: str, model) -> list:
    return [(f"{root}.{n}" if n else root, m) for n, m in model.named_modules()]


def find(models: dict, names, named=_torch_names) -> dict[str, torch.nn.Module]:
    """The modules named in precision.fp32_modules; a ConfigError with a did-you-mean for a wrong name.

    named(root, model) lists (path, module) as the report names them (Keras models: layer paths)."""
    table = {}
    for root, model in models.items():
        if model is not None:
            table.update(named(root, model))
    out = {}
    for name in names:
        if name not in table:
            hint = difflib.get_close_matches(name, list(table), n=1, cutoff=0.6)
            extra = f"did you mean '{hint[0]}'?" if hint else f"modules are named like {', '.join(list(table)[1:4])}"
            raise ConfigError(f"precision.fp32_modules: there is no module '{name}'; {extra}")
        out[name] = table[name]
    return out


def _cast(x, dtype: torch.dtype):
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
    if isinstance(x, (list, tuple)):
        items = [_cast(v, dtype) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return x


def _wrap(forward, device_type: str, out_dtype: torch.dtype | None):
    @functools.wraps(forward)
    def fp32_forward(*args, **kwargs):
        with torch.autocast(device_type, enabled=False):
            out = forward(*_cast(args, torch.float32), **_cast(kwargs, torch.float32))
        return out if out_dtype is None else _cast(out, out_dtype)

    return fp32_forward


@contextmanager
def outside_autocast(modules: dict, device_type: str, half_dtype: torch.dtype | None = None) -> Iterator[None]:
    """Run `modules` with autocast off on fp32 inputs; with half_dtype (half mode, where the caller keeps
    their weights fp32) cast their outputs back to it."""
    saved = []
    try:
        for m in modules.values():
            saved.append((m, m.__dict__.get("forward", _MISSING)))
            m.forward = _wrap(m.forward, device_type, half_dtype)  # an instance attribute shadows the method
        yield
    finally:
        for m, old in reversed(saved):
            if old is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.forward = old
