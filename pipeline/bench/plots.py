"""Pictures people would rather look at than read."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and the GPU machine have no display
import matplotlib.pyplot as plt  # noqa: E402


def latency_vs_batch(rows: list[dict], path: Path, title: str) -> Path:
    """rows: {"variant", "batch_size", "p50_ms", "p99_ms"}; one line per variant, log-log."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in sorted({r["variant"] for r in rows}):
        mine = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["batch_size"])
        xs = [r["batch_size"] for r in mine]
        line, = ax.plot(xs, [r["p50_ms"] for r in mine], marker="o", label=f"{name} p50")
        ax.plot(xs, [r["p99_ms"] for r in mine], linestyle=":", color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (users)")
    ax.set_ylabel("latency per call, ms (solid p50, dotted p99)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
