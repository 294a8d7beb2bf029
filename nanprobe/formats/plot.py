"""The range view as a PNG, with matplotlib (an optional extra: pip install "nanprobe[plot]")."""
from __future__ import annotations

from pathlib import Path

from nanprobe.enums import Phase, Precision
from nanprobe.model.comparison import Comparison

_PHASES = (Phase.FORWARD, Phase.INPUT_GRAD, Phase.BACKWARD)
_COLOURS = {Precision.FP32: "black", Precision.FP16: "tab:red", Precision.BF16: "tab:blue"}


def plot_ranges(c: Comparison, path: Path) -> None:
    """Per module and phase, log2|x| spans in each precision against fp16's and bf16's ranges; writes path only."""
    import matplotlib

    matplotlib.use("Agg")  # no display; never opens a window
    import matplotlib.pyplot as plt

    rows = sorted((m for m in c.modules if m.phase in _PHASES), key=lambda m: m.order)
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.22 * len(rows) + 1.5)))
    try:
        ranges = {r.precision: r for r in c.dtype_ranges}
        spans = [s for m in rows for s in m.spans if s.log2_min is not None]
        lo = min([ranges[Precision.FP16].log2_min_subnormal] + [s.log2_min for s in spans]) - 4  # type: ignore[operator, type-var]  # only spans with values get here
        hi = max([ranges[Precision.FP16].log2_max] + [s.log2_max for s in spans]) + 4  # type: ignore[operator, type-var]  # only spans with values get here
        for p, colour, alpha in ((Precision.BF16, "tab:blue", 0.06), (Precision.FP16, "tab:green", 0.12)):
            r = ranges[p]
            ax.axvspan(max(lo, r.log2_min_normal), min(hi, r.log2_max), color=colour, alpha=alpha,
                       label=f"{p.value} normal")
            if r.log2_min_normal > lo:  # bf16's subnormals usually lie far left of every value
                ax.axvspan(r.log2_min_subnormal, r.log2_min_normal, color="tab:orange", alpha=alpha * 1.5,
                           label=f"{p.value} subnormal")
        offsets = {p: 0.25 * (i - 1) for i, p in enumerate(c.precisions)}
        for y, m in enumerate(rows):
            for s in m.spans:
                if s.log2_min is None or s.log2_max is None:  # both None together: every value was 0
                    continue
                ax.plot([s.log2_min, s.log2_max], [y + offsets[s.precision]] * 2, color=_COLOURS[s.precision],
                        linewidth=2.5 if s.precision is Precision.FP32 else 1.5, solid_capstyle="butt",
                        label=s.precision.value if y == 0 else None)
        ax.set_yticks(range(len(rows)), [f"{m.module} {m.phase.value}" for m in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(lo, hi)
        ax.set_xlabel("log2 |x|  (smallest non-zero to largest)")
        ax.set_title(f"nanprobe compare-precisions: {c.config or ''}", fontsize=9)
        handles, labels = ax.get_legend_handles_labels()
        seen = dict(zip(labels, handles))
        ax.legend(seen.values(), seen.keys(), fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(Path(path), dpi=120)
    finally:
        plt.close(fig)
