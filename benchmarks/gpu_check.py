"""The GPU check, for a machine with a CUDA GPU (not a test): python benchmarks/gpu_check.py [--budget 450]

Checks what the CPU replays claim about a GPU, in one run of under 8 minutes, and prints one
markdown table (paste it into the README):
1. verdicts: every shipped example (configs/*.yaml) and every tests/zoo case, diagnosed with
   device: cuda, against the CPU replay with emulated kernels (precision.kernels: emulated);
2. the autocast-policy table: every sample op of tests/engine/test_autocast_policy.py under real
   CUDA autocast against nanprobe's CPU autocast with CUDA's op lists (the output dtypes);
3. per-op statistics (zeros, subnormals, inf, NaN, max |x|) of the CPU emulated replay against the
   CUDA replay of the same step on two examples, op by op (random numbers drawn on the CPU in both,
   so the two replays see the same data, latents and interpolates);
4. the probe's overhead on the GPU: one DCGAN-64 critic step with its penalty, batch 16, with and
   without the probe (medians of interleaved runs; target at most 1.3x).
Without a CUDA GPU it says so in one line and exits 2. `--against cpu-native` runs the same checks
(all but the autocast table) with the CPU's native kernels in the GPU's place, to try the script
on a machine without one.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STATS_EXAMPLES = ("wgan_gp_fp16_underflow", "amp_no_loss_scaling")


class _Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    @property
    def left(self) -> float:
        return self.end - time.monotonic()


def _cases() -> list[tuple[str, Path, dict]]:
    """(name, config, overrides): the shipped examples, then the zoo's cases with their data fixtures."""
    cases = [(p.stem, p, {}) for p in sorted((ROOT / "configs").glob("*.yaml"))]
    if (ROOT / "tests" / "zoo" / "test_zoo.py").is_file():
        import tempfile

        from tests.zoo.test_zoo import CASES, DATA, ZOO

        tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        for row in ZOO:
            overrides = {}
            if row.data is not None:
                path = tmp / f"{row.data}.npy"
                if not path.exists():
                    DATA[row.data](path)
                overrides["data.path"] = str(path)
            cases.append((f"zoo/{row.case}", CASES / f"{row.case}.yaml", overrides))
    return cases


def _verdict(run) -> str:
    issue = run.first_issue
    if issue is None:
        return run.status.value
    return f"{run.status.value}: {issue.kind.value} {issue.phase.value} {issue.module or '-'}"


# what the emulated CPU replay is compared with: the GPU, or (--against cpu-native) the CPU's own kernels
TARGET = {"device": "cuda"}


def check_verdicts(rows: list, deadline: _Deadline) -> None:
    import nanprobe

    for name, path, overrides in _cases():
        if deadline.left < 60:
            rows.append(("verdict", name, "-", "-", "not run: out of time"))
            continue
        try:
            cpu = nanprobe.diagnose(path, device="cpu", kernels="emulated", **overrides)
            gpu = nanprobe.diagnose(path, **TARGET, **overrides)
        except Exception as exc:  # a case the zoo marks as bad input, or a GPU-only failure: report, go on
            rows.append(("verdict", name, "-", "-", f"error: {str(exc).splitlines()[0][:80]}"))
            continue
        for c, g in zip(cpu.runs, gpu.runs):
            same = (c.status, c.first_issue and (c.first_issue.kind, c.first_issue.phase, c.first_issue.module)) == \
                   (g.status, g.first_issue and (g.first_issue.kind, g.first_issue.phase, g.first_issue.module))
            rows.append(("verdict", f"{name} {c.precision.value}", _verdict(c), _verdict(g), "yes" if same else "NO"))


def check_policy_table(rows: list) -> None:
    import torch

    from nanprobe.engine import autocast_policy as ap
    from tests.engine.test_autocast_policy import SAMPLES

    for dtype, label in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        wrong = []
        for name, sample in sorted(SAMPLES.items()):
            def run(device, ctx, sample=sample, dtype=dtype):
                torch.manual_seed(0)
                with torch.device(device), ctx:
                    return sample(dtype).dtype
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cpu = run("cpu", ap.cuda_autocast(dtype))
                gpu = run("cuda", torch.autocast("cuda", dtype=dtype))
            if cpu != gpu:
                wrong.append(f"{name} (cpu {cpu}, cuda {gpu})")
        rows.append(("autocast table", f"{len(SAMPLES)} ops, {label}", "cuda policy on the CPU", "torch.autocast cuda",
                     "yes" if not wrong else "NO: " + "; ".join(wrong)[:200]))


@contextmanager
def _cpu_random():
    """torch.rand/randn (and *_like) draw on the CPU and move to the GPU: both replays see the same numbers."""
    import torch

    saved = {n: getattr(torch, n) for n in ("rand", "randn", "rand_like", "randn_like")}

    def factory(name):
        fn = saved[name]

        def draw(*size, device=None, **kw):
            if device is not None and torch.device(device).type == "cuda":
                return fn(*size, device="cpu", **kw).to(device)
            return fn(*size, device=device, **kw)
        return draw

    def like(name):
        fn = saved[name.replace("_like", "")]

        def draw(t, dtype=None, device=None, **kw):
            dev = torch.device(device) if device is not None else t.device
            return fn(*t.shape, dtype=dtype or t.dtype, device="cpu").to(dev)
        return draw

    try:
        torch.rand, torch.randn = factory("rand"), factory("randn")
        torch.rand_like, torch.randn_like = like("rand_like"), like("randn_like")
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch, n, fn)


def check_op_stats(rows: list, deadline: _Deadline) -> None:
    import torch

    from nanprobe.engine import stats as st
    from nanprobe.engine.replay import replay
    from nanprobe.enums import Precision
    from nanprobe.io import config as cfg
    from nanprobe.io import loading

    for name in STATS_EXAMPLES:
        if deadline.left < 45:
            rows.append(("op stats", name, "-", "-", "not run: out of time"))
            continue
        config = cfg.load(ROOT / "configs" / f"{name}.yaml")
        other = cfg.with_overrides(config, kernels="native")
        loaded = loading.load(config)
        dev = torch.device(TARGET["device"])
        for p in (Precision.FP16, Precision.BF16):
            cpu = replay(config, loaded, p, torch.device("cpu"), probe=True).events
            with _cpu_random():
                gpu = replay(other, loaded, p, dev, probe=True).events
            pairs = [(c, g) for c, g in zip(cpu, gpu) if c.op == g.op and c.row is not None and g.row is not None]
            aligned = len(pairs)
            same_nonfinite = sum((c.row[st.POSINF] + c.row[st.NEGINF] > 0, c.row[st.NAN] > 0) ==
                                 (g.row[st.POSINF] + g.row[st.NEGINF] > 0, g.row[st.NAN] > 0) for c, g in pairs)

            def share(row, i):
                return row[i] / row[st.NUMEL] if row[st.NUMEL] else 0.0
            zeros = max((abs(share(c.row, st.ZEROS) - share(g.row, st.ZEROS)) for c, g in pairs), default=0.0)
            subn = max((abs(share(c.row, st.SUBNORMAL) - share(g.row, st.SUBNORMAL)) for c, g in pairs), default=0.0)
            ratios = [c.row[st.MAX_ABS] / g.row[st.MAX_ABS] for c, g in pairs if g.row[st.MAX_ABS] > 0 and
                      math.isfinite(c.row[st.MAX_ABS]) and math.isfinite(g.row[st.MAX_ABS])]
            worst = max((abs(math.log2(r)) for r in ratios if r > 0), default=0.0)
            first = next((c for c, g in pairs if (c.row[st.POSINF] + c.row[st.NEGINF] + c.row[st.NAN] > 0) !=
                          (g.row[st.POSINF] + g.row[st.NEGINF] + g.row[st.NAN] > 0)), None)
            detail = (f"{aligned}/{max(len(cpu), len(gpu))} ops aligned; inf/NaN pattern same in {same_nonfinite}; "
                      f"zeros share differs by <= {zeros:.2%}, subnormals by <= {subn:.2%}; "
                      f"max |x| within 2^{worst:.2f}")
            if first is not None:
                detail += f"; first inf/NaN difference at op {first.index} {first.op} ({first.module})"
            rows.append(("op stats", f"{name} {p.value}", f"{len(cpu)} ops", f"{len(gpu)} ops", detail))


def check_probe_overhead(rows: list, reps: int) -> None:
    import torch

    from benchmarks.bench_probe import CONFIG
    from nanprobe.engine.replay import replay
    from nanprobe.enums import Precision
    from nanprobe.io import config as cfg
    from nanprobe.io import loading

    doc = {**CONFIG, "device": TARGET["device"], "train": {"steps": 1, "grad_scaler": False},
           "loss": {"kind": "wgan-gp", "gp_precision": "autocast"}}
    config = cfg.from_dict(doc)
    loaded = loading.load(config)
    dev = torch.device(TARGET["device"])
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for p in (Precision.FP32, Precision.FP16, Precision.BF16):
        def timed(probe, p=p):
            sync()
            t = time.perf_counter()
            replay(config, loaded, p, dev, probe=probe)
            sync()
            return time.perf_counter() - t
        timed(False), timed(True)  # warm-up: kernels, allocator
        plain, probed = [], []
        for _ in range(reps):
            plain.append(timed(False))
            probed.append(timed(True))
        a, b = statistics.median(plain), statistics.median(probed)
        rows.append(("probe overhead", f"DCGAN-64 b16 {p.value}", f"plain {a * 1000:.0f} ms",
                     f"probe {b * 1000:.0f} ms", f"{b / a:.2f}x (target <= 1.3x)"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check (default 7.5 min)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--against", choices=("cuda", "cpu-native"), default="cuda",
                    help="cpu-native: the CPU's own kernels in the GPU's place (a dry run without a GPU)")
    args = ap.parse_args()
    import torch

    if args.against == "cpu-native":
        TARGET.update(device="cpu", kernels="native")
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); run it on a machine with one",
              file=sys.stderr)
        raise SystemExit(2)
    deadline = _Deadline(args.budget)
    started = time.monotonic()
    rows: list[tuple[str, str, str, str, str]] = []
    if args.against == "cuda":
        check_policy_table(rows)
    check_probe_overhead(rows, args.reps)
    check_op_stats(rows, deadline)
    check_verdicts(rows, deadline)
    name = torch.cuda.get_device_name() if args.against == "cuda" else "dry run against the CPU's native kernels"
    print(f"GPU check: {name}, torch {torch.__version__}, "
          f"{time.monotonic() - started:.0f} s\n")
    print(f"| check | case | CPU (emulated kernels) | {'CUDA' if args.against == 'cuda' else 'CPU native'} "
          "| agree / figure |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(c.replace("|", "/") for c in row) + " |")


if __name__ == "__main__":
    main()
