"""Pass@k curves as a PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from typing import Sequence

from dasd_megatron.eval.benchmarks import BENCHMARKS


def _label(key: str) -> str:
    return BENCHMARKS[key].name if key in BENCHMARKS else key


def plot_pass_at_k(runs: Sequence[tuple[str, dict]], path: str) -> str:
    """One panel per benchmark (and one for the macro average), one curve per run: Pass@k (%) against k (log2)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    keys: list[str] = []
    for _, m in runs:
        keys += [k for k in m["benchmarks"] if k not in keys]
    panels = keys + (["macro"] if any(m["macro"].get("benchmarks") for _, m in runs) else [])
    cols = min(4, max(1, len(panels)))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        for i, (name, m) in enumerate(runs):
            curve = m["macro"].get("pass_at_k", {}) if panel == "macro" else m["benchmarks"].get(panel, {}).get(
                "pass_at_k", {})
            if not curve:
                continue
            ks = sorted(curve, key=int)
            ax.plot([int(k) for k in ks], [curve[k] for k in ks], marker="o", ms=3, lw=1.5,
                    ls="-" if i == 0 else "--", label=name)
        ax.set_xscale("log", base=2)
        ticks = sorted({int(k) for _, m in runs for k in (m["macro"].get("pass_at_k", {}) if panel == "macro" else
                                                         m["benchmarks"].get(panel, {}).get("pass_at_k", {}))})
        if ticks:
            ax.set_xticks(ticks, [str(k) for k in ticks])
            ax.minorticks_off()
        ax.set_title("Macro" if panel == "macro" else _label(panel), fontsize=10)
        ax.set_xlabel("k")
        ax.set_ylabel("Pass@k (%)")
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
