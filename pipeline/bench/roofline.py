"""What the hardware can do, measured in the same run as the variants: copy bandwidth and matmul peak."""
from __future__ import annotations

import time

import torch


def _seconds(fn, device: torch.device, iters: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of fp32
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    seconds = _seconds(lambda: dst.copy_(src), device, iters=20 if device.type == "cuda" else 5)
    return 2 * src.numel() * src.element_size() / seconds


def matmul_peak(device: torch.device) -> tuple[float, str]:
    """(FLOP/s, dtype) of a large square matmul: bf16 on a GPU, fp32 on the CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _seconds(lambda: a @ b, device, iters=20 if device.type == "cuda" else 3)
    return 2 * n**3 / seconds, str(dtype).removeprefix("torch.")


def limit_seconds(table_bytes: float, flops: float, bandwidth: float, peak: float) -> float:
    """The roofline bound of one call: the item table read once, or the FLOPs at peak, whichever is longer."""
    return max(table_bytes / bandwidth, flops / peak)
