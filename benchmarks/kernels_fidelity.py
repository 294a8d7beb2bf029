"""Emulated against native fp16/bf16 kernels, verdict by verdict, run by hand (not a test):
python benchmarks/kernels_fidelity.py [--only NAME ...] [--skip-examples] [--skip-zoo]

For every shipped example (configs/*.yaml) and every zoo case (tests/zoo/cases/*.yaml) it runs
`diagnose` twice on the CPU, with `kernels: emulated` (the default) and `kernels: native`, and prints
what a user acts on, per precision: the status, the first issue (kind, phase, module, op, step) and
the first fix, with the time each took. "along the chain" marks the same status, kind, phase and
fix where one kernels' culprit lies on the other's chain, or both lead to the same first non-finite
op (a flush that builds up over several layers crosses the tolerance one layer earlier or later).
It exits 1 when any verdict differs beyond that, so a difference is never missed; each known one
must be explained in docs/concepts.md and pinned by a test.

The zoo's own test (tests/zoo/test_zoo.py::test_zoo_native_kernels_reach_the_same_verdict) checks the
zoo in CI; this script adds the shipped examples, whose native fp16 replays take minutes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The zoo's data fixtures (written to a temporary folder, never into the repo) and its verdict: what a user
# acts on, per precision (status, first issue or error, first fix).
from tests.zoo.test_zoo import DATA, ZOO, short_op, verdict  # noqa: E402


def chains(report) -> dict:
    """precision -> the (module, op) pairs on the path from the root cause on, and the first non-finite op."""
    out = {}
    for run in report.runs:
        nf = run.first_nonfinite
        end = None if nf is None else ("nonfinite", nf.phase.value, nf.op, nf.source, nf.step)
        out[run.precision.value] = {(c.module, short_op(c.op)) for c in run.chain} | ({end} if end else set())
    return out


def along_the_chain(a: list, b: list, chain_a: dict, chain_b: dict) -> bool:
    """The same status, kind, phase and first fix everywhere, where one culprit lies on the other's chain:
    a flush that builds up over several layers crosses the tolerance one op earlier or later."""
    for (p, st_a, i_a, f_a), (_, st_b, i_b, f_b) in zip(a, b):
        if (st_a, f_a) != (st_b, f_b) or (i_a is None) != (i_b is None):
            return False
        if i_a is None or i_a == i_b:
            continue
        if i_a[:2] != i_b[:2]:
            return False
        on_chain = (i_b[2], i_b[3]) in chain_a[p] or (i_a[2], i_a[3]) in chain_b[p]
        ends = {x for x in chain_a[p] if x[0] == "nonfinite"}
        same_end = bool(ends) and ends == {x for x in chain_b[p] if x[0] == "nonfinite"}
        if not (on_chain or same_end):
            return False
    return len(a) == len(b)


def cases(args, tmp: Path) -> list[tuple[str, Path, dict]]:
    found = []
    if not args.skip_examples:
        for path in sorted((ROOT / "configs").glob("*.yaml")):
            found.append((f"example {path.stem}", path, {}))
    if not args.skip_zoo:
        data = {r.case: r.data for r in ZOO}
        cases_dir = ROOT / "tests/zoo/cases"
        for path in sorted([*cases_dir.glob("*.yaml"), *cases_dir.glob("*/config.yaml")]):
            overrides = {}
            if data.get(path.stem):
                file = tmp / f"{data[path.stem]}.npy"
                DATA[data[path.stem]](file)
                overrides["data.path"] = str(file)
            found.append((f"zoo {path.stem if path.stem != 'config' else path.parent.name}", path, overrides))
    if args.only:
        found = [c for c in found if any(o in c[0] for o in args.only)]
    return found


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=[])
    ap.add_argument("--skip-examples", action="store_true")
    ap.add_argument("--skip-zoo", action="store_true")
    args = ap.parse_args()
    import tempfile

    import torch

    import nanprobe

    print(f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print("| case | emulated s | native s | same verdict | verdict (emulated) | native, where it differs |")
    print("|---|---:|---:|:---:|---|---|")
    differ = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, overrides in cases(args, Path(tmp)):
            got, chain = {}, {}
            for kernels in ("emulated", "native"):
                t = time.perf_counter()
                report = nanprobe.diagnose(path, kernels=kernels, **overrides)
                got[kernels] = (verdict(report), time.perf_counter() - t)
                chain[kernels] = chains(report)
            same = got["emulated"][0] == got["native"][0]
            shifted = not same and along_the_chain(got["emulated"][0], got["native"][0], chain["emulated"],
                                                   chain["native"])
            differ += not (same or shifted)
            show = "; ".join(f"{p} {s}" + (f" {i[0]}@{i[1]} {i[2]} {i[3]}" if i else "") + (f" → {f}" if f else "")
                             for p, s, i, f in got["emulated"][0])
            other = "" if same else "; ".join(f"{p} {i[2]} {i[3]}" for p, _, i, _ in got["native"][0] if i)
            tag = "yes" if same else ("along the chain" if shifted else "NO")
            print(f"| {name} | {got['emulated'][1]:.1f} | {got['native'][1]:.1f} | {tag} "
                  f"| {show} | {other} |", flush=True)
    print(f"\n{differ} case(s) differ beyond a culprit shifted along its chain")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
