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
    return _save(fig, ax, title, path)


def quality_vs_latency(rows: list[dict], earlier: list[dict], path: Path, title: str, latency_key: str) -> Path:
    """One point per variant: HR@10 against `latency_key` (e.g. latency_p99_ms_b1). This run's variants are
    labelled (hollow when they fail their gates); earlier runs of the same config are grey dots behind them."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    old = [r for r in earlier if latency_key in r and "hr10" in r]
    if old:
        ax.scatter([r[latency_key] for r in old], [r["hr10"] for r in old], color="0.75", s=18, label="earlier runs")
    for i, row in enumerate(rows):
        passed = row.get("gate_passed", 1.0) >= 1.0
        ax.scatter([row[latency_key]], [row["hr10"]], s=60, edgecolors=f"C{i}", facecolors=f"C{i}" if passed else "none",
                   label=row["variant"] + ("" if passed else " (gates failed)"))
        ax.annotate(row["variant"], (row[latency_key], row["hr10"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"{latency_key} (log)")
    ax.set_ylabel("HR@10 (test)")
    return _save(fig, ax, title, path)


def _save(fig, ax, title: str, path: Path) -> Path:
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
