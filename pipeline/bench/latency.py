"""Latency of a variant over a batch-size sweep, measured the same way for every variant.

GPU: CUDA events around each call after warm-up. CPU: perf_counter with a fixed thread count.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
import torch

if TYPE_CHECKING:  # the bench imports this module on GPU hosts that carry only torch and numpy
    from pipeline.data import Split


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sample_inputs(split: Split, batch_size: int, device: torch.device, seed: int = 0):
    """A batch of real histories (with replacement when the split is smaller than the batch)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, split.target.shape[0], (batch_size,), generator=gen)
    ts = None if split.timestamps is None else split.timestamps[idx].to(device)
    return split.history[idx].to(device), split.lengths[idx].to(device), ts


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> np.ndarray:
    """Milliseconds per call, one sample per call."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return np.array([s.elapsed_time(e) for s, e in zip(starts, ends)])
    samples = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter()
        fn()
        samples[i] = (time.perf_counter() - t0) * 1e3
    return samples


def summarize(samples_ms: np.ndarray, batch_size: int) -> dict[str, float]:
    p50, p90, p99 = np.percentile(samples_ms, [50, 90, 99])
    return {
        "batch_size": batch_size,
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(samples_ms.mean()),
        "users_per_s": batch_size / (float(p50) / 1e3),
    }


@torch.no_grad()
def latency_sweep(
    predict: Callable,
    split: Split,
    batch_sizes: Iterable[int],
    device: torch.device,
    warmup: int,
    iters: int,
    num_threads: int | None = None,
) -> list[dict[str, float]]:
    rows = []
    with cpu_threads(num_threads if device.type == "cpu" else None):
        for b in batch_sizes:
            history, lengths, ts = sample_inputs(split, b, device)
            samples = time_calls(lambda: predict(history, lengths, ts), device, warmup, iters)
            rows.append(summarize(samples, b))
    return rows


def latency_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Stable MLflow names: latency_p50_ms_b1, users_per_s_b128, ..."""
    out = {}
    for row in rows:
        b = int(row["batch_size"])
        for q in ("p50", "p90", "p99"):
            out[f"latency_{q}_ms_b{b}"] = row[f"{q}_ms"]
        out[f"users_per_s_b{b}"] = row["users_per_s"]
    return out
