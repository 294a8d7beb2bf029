"""Reading a whole data file (.npy or .pt) in chunks, in memory bounded by the chunk size.

The file is memory-mapped (numpy's mmap_mode, torch.load(mmap=True)); once a chunk has been read,
its pages are handed back to the kernel (madvise DONTNEED), so they leave the process's resident
set and a file larger than memory streams through. Opening a .npy file does not import torch.
"""
from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nanprobe.errors import ConfigError
from nanprobe.io import config as cfg


@dataclass(frozen=True)
class DataFile:
    """An opened data file."""

    path: Path
    """Where it is."""
    array: Any
    """The whole array [N, ...]: a numpy memmap, or a torch tensor (memory-mapped unless a legacy .pt)."""
    format: str
    """npy | pt."""
    memory_mapped: bool
    """False when the file had to be read whole (a legacy .pt)."""
    notes: tuple[str, ...] = ()
    """Why it was not memory-mapped, or how it is read."""

    @property
    def row_bytes(self) -> int:
        """Bytes of one sample."""
        a = self.array
        item = a.itemsize if isinstance(a, np.ndarray) else a.element_size()
        return max(1, int(np.prod(a.shape[1:])) * item)


def open_file(config: cfg.Config) -> DataFile:
    """The config's data file, checked (exists, .npy/.pt, a real-valued array [N, ...] matching data.shape)."""
    d = config.data
    if d.source != "file":
        raise ConfigError("data.source is synthetic: there is no data file to scan (synthetic samples are drawn "
                          "inside data.range); set data.source: file and data.path to check a data set")
    path = cfg.resolve(config, d.path)
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except OSError as exc:
        raise ConfigError(f"data.path: cannot read {path}: {exc.strerror or exc}") from None
    if not is_file:
        raise ConfigError(f"data.path: {'is a folder' if is_dir else 'file not found'}: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        f = _open_npy(path)
    elif suffix in (".pt", ".pth"):
        f = _open_pt(path)
    else:
        raise ConfigError(f"data.path: {path.name} must be a .npy or .pt file")
    if not _real(f.array):
        raise ConfigError(f"data.path: {path.name} has dtype {f.array.dtype}; expected a real number type")
    check_samples(config, tuple(f.array.shape), path.name)
    return f


def check_samples(config: cfg.Config, shape: tuple[int, ...], name: str) -> None:
    """The one rule for a data set, from a file or passed from Python: [N, C, H, W] with N > 0, matching data.shape."""
    if len(shape) != 4:
        raise ConfigError(f"data.path: {name} has shape {list(shape)}; expected [N, C, H, W]")
    if shape[0] == 0:
        raise ConfigError(f"data.path: {name} holds no samples")
    d = config.data
    if d.shape is not None and tuple(d.shape) != shape[1:]:
        raise ConfigError(f"data.shape: {list(d.shape)} does not match {name}, whose samples are {list(shape[1:])}")


def chunks(f: DataFile, chunk_mb: float) -> Iterator[tuple[int, np.ndarray]]:
    """(first index, samples as a 2-D numpy array [n, features]) for consecutive chunks of about chunk_mb."""
    a = f.array
    n = a.shape[0]
    rows = max(1, int(chunk_mb * 2**20) // f.row_bytes)
    for start in range(0, n, rows):
        chunk = a[start:start + rows]
        pages = _address(chunk) if f.memory_mapped else None
        yield start, as_2d(chunk)
        del chunk
        if pages is not None:
            _drop_pages(*pages)


def as_2d(chunk) -> np.ndarray:
    """Samples [n, ...] (numpy or torch) as a numpy array [n, features], a view when it can be."""
    if isinstance(chunk, np.ndarray):
        return chunk.reshape(len(chunk), -1)
    import torch

    if chunk.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        chunk = chunk.float()  # numpy has no such dtype: this chunk is copied as float32
    return chunk.contiguous().reshape(len(chunk), -1).numpy()


def _real(a) -> bool:
    """A real number dtype (float, int, uint), numpy or torch."""
    if isinstance(a, np.ndarray):
        return a.dtype.kind in "fiu"
    return a.is_floating_point() or not (a.is_complex() or str(a.dtype) == "torch.bool")


def _open_npy(path: Path) -> DataFile:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        if "pickled" in first or "allow_pickle" in first or "Python objects" in first:
            first = "it is not a .npy array file (numpy.load found pickled data, which nanprobe does not load)"
        raise ConfigError(f"data.path: cannot read {path.name}: {first[:200]}") from None
    if not isinstance(arr, np.memmap):  # numpy does not map an empty array
        return DataFile(path, arr, "npy", False)
    return DataFile(path, arr, "npy", True)


def _open_pt(path: Path) -> DataFile:
    import torch

    notes: tuple[str, ...] = ()
    try:
        try:
            t = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            mapped = True
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            t = torch.load(path, map_location="cpu", weights_only=True)
            mapped = False
            notes = (f"{path.name} is in torch.save's legacy format, which cannot be memory-mapped: it was read "
                     "whole into memory. Re-save it with torch.save (zip format, the default since PyTorch 1.6) "
                     "or as .npy to scan it in bounded memory.",)
    except Exception as exc:
        raise torch_load_error("data.path", path, exc, "save a tensor [N, C, H, W] with torch.save") from None
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"data.path: {path.name} holds a {type(t).__name__}, not a tensor [N, C, H, W]")
    if mapped and not t.is_contiguous():
        notes += ("the tensor is not contiguous: each chunk is copied before it is checked",)
    return DataFile(path, t, "pt", mapped, notes)


def _address(chunk) -> tuple[int, int] | None:
    """(address, bytes) of a contiguous chunk, None otherwise."""
    if isinstance(chunk, np.ndarray):
        return (chunk.ctypes.data, chunk.nbytes) if chunk.flags.c_contiguous else None
    if chunk.is_contiguous():
        return chunk.data_ptr(), chunk.numel() * chunk.element_size()
    return None


def _drop_pages(address: int, nbytes: int) -> None:
    """Hand the mapped file pages under [address, address + nbytes) back to the kernel.

    Only whole pages inside the range, never a neighbour's. The pages are clean (read-only), so
    reading them again faults them back in from the file.
    """
    madvise = _madvise()
    if madvise is None:
        return
    import ctypes

    page = mmap.PAGESIZE
    start = -(-address // page) * page
    end = (address + nbytes) // page * page
    if end > start:
        madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


_libc: list = []


def _madvise():
    """libc's madvise, or None where there is none (then resident memory can grow up to the file size)."""
    if not _libc:
        fn = None
        if hasattr(mmap, "MADV_DONTNEED"):
            try:
                import ctypes
                import ctypes.util

                fn = getattr(ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True), "madvise", None)
            except OSError:
                fn = None
        _libc.append(fn)
    return _libc[0]


def torch_load_error(key: str, path: Path, exc: BaseException, save_hint: str) -> ConfigError:
    """One line for a file torch.load(weights_only=True) cannot or will not read.

    torch's own message is a multi-line essay (with ANSI codes) whose first line says nothing about
    this file; the useful part is the 'Unsupported global' or the 'WeightsUnpickler error' detail.
    """
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    glob = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if glob:
        return ConfigError(f"{key}: {path.name} holds objects that torch.load(weights_only=True) refused "
                           f"(it would have to import {glob.group(1)}); no code from it was run: {save_hint}")
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if detail or "weights_only" in text or "pickle" in type(exc).__name__.lower():
        why = detail.group(1).strip() if detail else type(exc).__name__
        return ConfigError(f"{key}: cannot read {path.name}: torch.load(weights_only=True) refused it "
                           f"({why[:160]}); no code from it was run: is it a file written by torch.save?")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    what = f"{type(exc).__name__}: {first[:160]}" if first else type(exc).__name__
    return ConfigError(f"{key}: cannot read {path.name} ({what}); is it a file written by torch.save?")
