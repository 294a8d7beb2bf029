"""check-data benchmark, run by hand (not a test): python benchmarks/bench_check_data.py [--gb 2.1]

Writes a float32 .npy of [N, 3, 64, 64] images in [-1, 1] (at least --gb gigabytes, in chunks, never
held whole in memory) into a temporary folder, with NaN samples, Inf samples and constant images at
known indices (some across chunk boundaries). Then runs `nanprobe check-data` on it in a fresh
subprocess per setting and prints, for each: file size, wall time, throughput, the subprocess's peak
RSS (from wait4, so it is that process alone), and whether every injected index was found.

Settings: the default 64 MB chunks with the file evicted from the page cache first (a cold read from
disk), the same warm (from the page cache), and 8 MB and 512 MB chunks warm, to show peak memory
following the chunk size. The folder is deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = (3, 64, 64)
WRITE_ROWS = 2048  # samples generated and written at a time


def _injected(n: int, rows_per_chunk: int) -> dict[str, list[int]]:
    edge = rows_per_chunk  # the first chunk boundary of a 64 MB scan
    return {
        "nan": sorted({0, 17, edge - 1, edge, n // 2, n - 1}),
        "inf": sorted({5, edge + 1, n // 3, n - 2}),
        "constant": sorted({1, edge - 2, edge + 2, 2 * n // 3, n - 3}),
    }


def write(path: Path, gb: float) -> tuple[int, dict]:
    row_bytes = int(np.prod(SAMPLE)) * 4
    n = int(gb * 1e9) // row_bytes + 1
    bad = _injected(n, (64 << 20) // row_bytes)
    rng = np.random.default_rng(0)
    header = {"descr": "<f4", "fortran_order": False, "shape": (n, *SAMPLE)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, n, WRITE_ROWS):
            stop = min(n, start + WRITE_ROWS)
            x = rng.random((stop - start, *SAMPLE), dtype=np.float32) * 2 - 1
            for i in bad["nan"]:
                if start <= i < stop:
                    x[i - start, 1, 10:12, 20:30] = np.nan
            for k, i in enumerate(bad["inf"]):
                if start <= i < stop:
                    x[i - start, 0, 3, 3] = np.inf if k % 2 else -np.inf
            for i in bad["constant"]:
                if start <= i < stop:
                    x[i - start] = 0.25
            f.write(x.tobytes())
        f.flush()
        os.fsync(f.fileno())
    return n, bad


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache, so the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(config: Path, out: Path, chunk_mb: float) -> dict:
    """One check-data in a fresh process; its peak RSS is its own VmHWM, polled until it exits.

    (getrusage/wait4's ru_maxrss would not do: exec keeps the high-water mark of the forked copy of
    this process, which has just generated the data.)
    """
    cmd = [sys.executable, "-m", "nanprobe", "check-data", str(config), "--json", str(out), "-q", "--chunk-mb",
           str(chunk_mb)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    peak = 0.0
    while proc.poll() is None:
        hwm = _hwm_mb(proc.pid)
        peak = max(peak, hwm or 0.0)
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    return {"wall": wall, "rc": proc.returncode, "rss_mb": peak, "report": json.loads(out.read_text())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.1, help="file size in GB (10^9 bytes)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nanprobe-bench-") as tmp:
        tmp = Path(tmp)
        data, config = tmp / "big.npy", tmp / "config.yaml"
        t0 = time.perf_counter()
        n, bad = write(data, args.gb)
        size = data.stat().st_size
        print(f"wrote {data.name}: {n} samples of {list(SAMPLE)} float32, {size / 1e9:.2f} GB "
              f"({size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")
        print(f"injected: NaN samples {bad['nan']}, Inf samples {bad['inf']}, constant images {bad['constant']}")
        config.write_text(f"model: {{critic: 'models.py:DCGANCritic'}}\n"
                          f"data: {{source: file, path: {data.name}, shape: {list(SAMPLE)}, range: [-1, 1]}}\n")
        want_bad = sorted(set(bad["nan"]) | set(bad["inf"]))
        base = subprocess.run([sys.executable, "-c",
                               "import nanprobe.analysis.datacheck, nanprobe.cli, nanprobe.formats.checks;"
                               "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"],
                              cwd=ROOT, capture_output=True, text=True, check=True)
        print("peak RSS of the interpreter with check-data's modules imported, before any scan: "
              f"{int(base.stdout) / 1024:.0f} MB")
        print(f"\n{'setting':<26} {'wall s':>7} {'scan s':>7} {'GB/s':>6} {'peak RSS MB':>12} {'exit':>5}  "
              "found all injected")
        for label, chunk, cold in (("64 MB chunks, cold cache", 64, True), ("64 MB chunks, warm cache", 64, False),
                                   ("8 MB chunks, warm cache", 8, False), ("512 MB chunks, warm cache", 512, False)):
            if cold:
                evict(data)
            r = run(config, tmp / "out.json", chunk)
            rep = r["report"]
            found = (list(rep["nonfinite"]["indices"]) == want_bad and rep["nonfinite"]["count"] == len(want_bad)
                     and list(rep["constant"]["indices"]) == bad["constant"]
                     and rep["constant"]["count"] == len(bad["constant"])
                     and rep["nonfinite"]["counts"]["samples_with_nan"] == len(bad["nan"])
                     and rep["nonfinite"]["counts"]["samples_with_inf"] == len(bad["inf"]))
            print(f"{label:<26} {r['wall']:>7.1f} {rep['seconds']:>7.1f} {size / 1e9 / rep['seconds']:>6.2f} "
                  f"{r['rss_mb']:>12.0f} {r['rc']:>5}  {found}")
        print("\n(wall: the whole process, start-up included; scan: the scan as check-data timed it; GB/s from scan)")


if __name__ == "__main__":
    main()
