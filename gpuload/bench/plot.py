"""The PNG chart of `gpuload bench --plot`: tokens/s per provider, grouped by batch shape."""

from __future__ import annotations

import numpy as np


def write_plot(rows: list[dict], machine: dict, path: str) -> None:
    """Grouped bars (one group per shape, one bar per provider), log scale, speedup vs nanogpt on each bar."""
    # The Agg canvas directly, not pyplot: no GUI backend is chosen, and pyplot's global state is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shapes = list(dict.fromkeys((r["batch_size"], r["seq_len"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    by_key = {(r["provider"], r["batch_size"], r["seq_len"]): r for r in rows}
    width = 0.8 / len(providers)
    fig = Figure(figsize=(max(6.0, 1.2 + 0.45 * len(shapes) * len(providers)), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, name in enumerate(providers):
        xs, heights, labels = [], [], []
        for j, (b, t) in enumerate(shapes):
            row = by_key.get((name, b, t))
            if row is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            heights.append(row["tokens_per_s"] / 1e6)
            speedup = row["speedup_vs_nanogpt"]
            labels.append(f"{speedup:.1f}x" if speedup is not None else "")
        bars = ax.bar(xs, heights, width, label=name)
        ax.bar_label(bars, labels, fontsize=7, padding=2)
    ax.set_xticks(np.arange(len(shapes)), [f"B={b}, T={t}" for b, t in shapes])
    ax.set_yscale("log")
    ax.set_ylabel("Mtokens/s (log scale; label: speedup vs nanogpt)")
    device = rows[0]["device"]
    where = machine["gpu"] if device.startswith("cuda") else f"{machine['cpu']}, {machine['cores']} cores"
    ax.set_title(f"gpuload bench on {device}: {where}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.margins(y=0.15)
    fig.savefig(path, dpi=120)
