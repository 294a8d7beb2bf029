"""Data checks: samples holding NaN or Inf, constant images, and values outside the range the config
expects, over a whole data file in bounded memory (`check-data`, through datafile.chunks) or over
the samples a replay uses (`diagnose`).

Per sample the checks need only its min and max: NaN and Inf propagate into them, and a sample is
constant (zero variance) exactly when its min equals its max. No torch import for a .npy file.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from nanprobe.analysis import fixes
from nanprobe.enums import DataProblem
from nanprobe.errors import ConfigError
from nanprobe.io import config as cfg
from nanprobe.io import datafile
from nanprobe.model.checks import BadSamples, DataReport, RangeCheck
from nanprobe.model.report import FixSuggestion
from nanprobe.thresholds import DEFAULT_CHUNK_MB, FILL, MAX_INDICES, RANGE_SLACK

KNOWN_RANGES = (
    ("images in [0, 1]", 0.0, 1.0),
    ("images in [-1, 1]", -1.0, 1.0),
    ("unnormalised 8-bit images (0..255)", 0.0, 255.0),
    ("unnormalised 16-bit images (0..65535)", 0.0, 65535.0),
)
"""Ranges data often comes in, to name the likely cause of a mismatch: (name, low, high)."""


class _Tally:
    """Running counts over chunks of samples (internal)."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi, self.slack = lo, hi, RANGE_SLACK * (hi - lo)
        self.samples = self.finite_samples = 0
        self.vmin, self.vmax = np.inf, -np.inf
        self.idx: dict[DataProblem, list[int]] = {p: [] for p in DataProblem}
        self.count = dict.fromkeys(DataProblem, 0)
        self.nan = {"samples_with_nan": 0, "samples_with_inf": 0, "nan_values": 0, "posinf_values": 0,
                    "neginf_values": 0}
        self.constant_values: list[float] = []

    def _keep(self, problem: DataProblem, index: np.ndarray, mask: np.ndarray) -> int:
        """Count the samples under mask; returns how many of them were listed."""
        hit = index[mask]
        self.count[problem] += len(hit)
        room = max(0, min(len(hit), MAX_INDICES - len(self.idx[problem])))
        self.idx[problem] += [int(i) for i in hit[:room]]
        return room

    def add(self, index: np.ndarray, x: np.ndarray) -> None:
        """Count the samples x [n, features] whose indices in the file are `index`."""
        mins, maxs = x.min(1), x.max(1)
        self.samples += len(x)
        finite = np.ones(len(x), bool)
        if x.dtype.kind == "f":
            finite = np.isfinite(mins) & np.isfinite(maxs)
            if not finite.all():
                self._nonfinite(index, x, ~finite)
        if finite.any():
            lo, hi = mins[finite], maxs[finite]
            self.vmin, self.vmax = min(self.vmin, float(lo.min())), max(self.vmax, float(hi.max()))
        self.finite_samples += int(finite.sum())
        constant = finite & (mins == maxs)
        listed = self._keep(DataProblem.CONSTANT, index, constant)
        self.constant_values += [float(v) for v in mins[constant][:listed]]
        self._keep(DataProblem.RANGE, index, finite & ((mins < self.lo - self.slack) | (maxs > self.hi + self.slack)))

    def _nonfinite(self, index: np.ndarray, x: np.ndarray, bad: np.ndarray) -> None:
        rows = x[bad]  # a copy of the bad rows only
        nan, pos, neg = np.isnan(rows), np.isposinf(rows), np.isneginf(rows)
        self.nan["samples_with_nan"] += int(nan.any(1).sum())
        self.nan["samples_with_inf"] += int((pos | neg).any(1).sum())
        self.nan["nan_values"] += int(nan.sum())
        self.nan["posinf_values"] += int(pos.sum())
        self.nan["neginf_values"] += int(neg.sum())
        ok = ~(nan | pos | neg)
        if ok.any():
            self.vmin, self.vmax = min(self.vmin, float(rows[ok].min())), max(self.vmax, float(rows[ok].max()))
        self._keep(DataProblem.NONFINITE, index, bad)

    def report(self, **where) -> DataReport:
        nonfinite = BadSamples(DataProblem.NONFINITE, self.count[DataProblem.NONFINITE],
                               tuple(self.idx[DataProblem.NONFINITE]), dict(self.nan))
        constant = BadSamples(DataProblem.CONSTANT, self.count[DataProblem.CONSTANT],
                              tuple(self.idx[DataProblem.CONSTANT]),
                              {"values": [round(v, 6) for v in self.constant_values[:5]]})
        rng = self._range(where.get("dtype", ""))
        rep = DataReport(nonfinite=nonfinite, constant=constant, range=rng, **where)
        return rep if rep.ok else replace(rep, fix=_fix(rep))

    def _range(self, dtype: str) -> RangeCheck:
        lo, hi = self.lo, self.hi
        if self.finite_samples == 0:
            return RangeCheck((lo, hi), None, None, True, 0, 0.0, ())
        vmin, vmax = self.vmin, self.vmax
        out = self.count[DataProblem.RANGE]
        share = out / self.finite_samples
        known = _known(vmin, vmax)
        fills = known is not None and (vmin <= known[1] + FILL * (known[2] - known[1])
                                       and vmax >= known[2] - FILL * (known[2] - known[1]))
        elsewhere = fills and (known[1], known[2]) != (lo, hi)
        ok = out == 0 and not elsewhere
        cause = transform = None
        if not ok:
            if known is not None and (known[1], known[2]) != (lo, hi):
                integer = dtype.startswith(("uint", "int", "torch.uint", "torch.int"))
                cause = known[0] + (f" stored as {dtype.removeprefix('torch.')}" if integer else "")
                transform = _affine(known[1], known[2], lo, hi)
            else:
                cause = (f"values from {vmin:.4g} to {vmax:.4g}, outside data.range and every usual image range "
                         "(a broken decode, or the wrong dtype?)")
        return RangeCheck((lo, hi), vmin, vmax, ok, out, round(share, 6), tuple(self.idx[DataProblem.RANGE]), cause,
                          transform)


def _known(vmin: float, vmax: float):
    """The narrowest usual range holding [vmin, vmax], or None."""
    fits = [k for k in KNOWN_RANGES
            if vmin >= k[1] - RANGE_SLACK * (k[2] - k[1]) and vmax <= k[2] + RANGE_SLACK * (k[2] - k[1])]
    return min(fits, key=lambda k: k[2] - k[1]) if fits else None


def _affine(a_lo: float, a_hi: float, lo: float, hi: float) -> str:
    """`x * s + t` mapping [a_lo, a_hi] onto [lo, hi], written as people write it (x / 127.5 - 1)."""
    s = (hi - lo) / (a_hi - a_lo)
    t = lo - a_lo * s
    text = "x" if s == 1 else (f"x / {1 / s:g}" if s < 1 else f"x * {s:g}")
    if t:
        text += f" + {t:g}" if t > 0 else f" - {-t:g}"
    return text


def _few(b) -> str:
    if not b.count:
        return "none"
    more = f" ... ({b.count} in all)" if b.count > len(b.indices) else ""
    return ", ".join(map(str, b.indices)) + more


def _fix(rep: DataReport) -> FixSuggestion:
    r = rep.range
    lo, hi = (f"{v:g}" for v in r.expected)
    if r.ok:
        normalise = f"# the values are already within data.range [{lo}, {hi}]"
    elif r.transform:
        normalise = f"x = {r.transform}   # to data.range [{lo}, {hi}]"
    else:
        normalise = f"# {r.cause}: find where the values leave data.range [{lo}, {hi}]"
    return fixes.adapt("data", bad_samples=_few(rep.nonfinite), constant_samples=_few(rep.constant),
                       normalise=normalise)


def scan(config: cfg.Config, progress: Callable[[int, int], None] | None = None,
         chunk_mb: float = DEFAULT_CHUNK_MB) -> DataReport:
    """Check every sample of the config's data file, chunk by chunk; progress(done_bytes, total_bytes)."""
    if not chunk_mb > 0:
        raise ConfigError(f"--chunk-mb: must be > 0, got {chunk_mb}")
    t0 = time.perf_counter()
    f = datafile.open_file(config)
    n = f.array.shape[0]
    total = n * f.row_bytes
    tally = _Tally(*config.data.range)
    for start, x in datafile.chunks(f, chunk_mb):
        tally.add(np.arange(start, start + len(x)), x)
        if progress is not None:
            progress((start + len(x)) * f.row_bytes, total)
    return tally.report(path=str(f.path), format=f.format, dtype=str(f.array.dtype), shape=tuple(f.array.shape),
                        samples=n, nbytes=total, memory_mapped=f.memory_mapped, scope="file", notes=f.notes,
                        seconds=round(time.perf_counter() - t0, 3), chunk_mb=chunk_mb)


def check_replayed(config: cfg.Config, data, steps: int | None = None) -> DataReport | None:
    """Check the samples a replay of `steps` critic steps uses (None for synthetic data)."""
    if data is None or config.data.source != "file":
        return None
    n, b = data.shape[0], config.data.batch_size
    idx = np.unique([(s * b + i) % n for s in range(steps or config.train.steps) for i in range(b)])
    tally = _Tally(*config.data.range)
    chunk = data[idx] if isinstance(data, np.ndarray) else data[idx.tolist()]
    x = datafile.as_2d(chunk)
    tally.add(idx, x)
    path = config.data.path
    # A tensor or array passed from Python (nanprobe.watch, the API) has no file to name.
    where, fmt = (str(cfg.resolve(config, path)), path.suffix.lstrip(".")) if isinstance(path, Path) else \
        ("the batch passed in", type(path).__name__)
    return tally.report(path=where, format=fmt,
                       dtype=str(data.dtype), shape=tuple(data.shape), samples=len(idx), nbytes=int(x.nbytes),
                       memory_mapped=isinstance(data, np.memmap), scope="replayed",
                       notes=(f"only the {len(idx)} samples the replay uses were checked; run "
                              "`nanprobe check-data` on this config to scan the whole file",))


def check_data(config_or_path: cfg.Config | str | Path, progress: Callable[[int, int], None] | None = None,
               chunk_mb: float = DEFAULT_CHUNK_MB, **overrides) -> DataReport:
    """Scan the config's whole data file for NaN/Inf samples, constant images and a range that does not match.

    Overrides take dotted or short keys as for diagnose (e.g. data__range=[0, 1]). Reads .npy through a
    memory map without importing torch; raises nanprobe.ConfigError on bad input.
    """
    config = config_or_path if isinstance(config_or_path, cfg.Config) else cfg.load(Path(config_or_path))
    if overrides:
        config = cfg.with_overrides(config, **overrides)
    return scan(config, progress, chunk_mb)
