"""Triton side of layer_norm(x) * u (see ln_gate.py). Imported only when it runs."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from pipeline.kernels import dispatch
from pipeline.kernels.ln_gate import layer_norm_gate_reference


@triton.jit
def _ln_gate(X, U, Y, R, D, stride_x, stride_u, eps, SILU_U: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    ok = (rows < R)[:, None] & (cols < D)[None, :]
    offsets = rows[:, None] * D + cols[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    centered = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / D + eps)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if SILU_U:
        u = u * tl.sigmoid(u)
    tl.store(Y + offsets, (centered * rstd[:, None] * u).to(Y.dtype.element_ty), mask=ok)


def gate(x: Tensor, u: Tensor, eps: float, silu_u: bool = False) -> Tensor:
    """layer_norm_gate, or the reference at shapes where it was timed faster (pipeline.kernels.dispatch)."""
    if x.shape != u.shape:
        raise ValueError(f"layer_norm_gate: x {tuple(x.shape)} and u {tuple(u.shape)} differ")
    width = x.shape[-1]
    key = (dispatch.batch_bucket(x.numel() // max(1, width)), width, x.dtype, silu_u)
    chosen = dispatch.choice("ln_gate", key) or dispatch.choose(
        "ln_gate", key, x.device,
        dispatch.Option(dispatch.REFERENCE, None, functools.partial(_reference, x, u, eps, silu_u)),
        [dispatch.Option("triton", None, functools.partial(layer_norm_gate, x, u, eps, silu_u))])
    if chosen.algorithm == dispatch.REFERENCE:
        return _reference(x, u, eps, silu_u)
    return layer_norm_gate(x, u, eps, silu_u)


def _reference(x: Tensor, u: Tensor, eps: float, silu_u: bool) -> Tensor:
    return layer_norm_gate_reference(x, u, eps, silu_u).contiguous()


def layer_norm_gate(x: Tensor, u: Tensor, eps: float, silu_u: bool = False) -> Tensor:
    if x.shape != u.shape:
        raise ValueError(f"layer_norm_gate: x {tuple(x.shape)} and u {tuple(u.shape)} differ")
    D = x.shape[-1]
    # Row-strided views (u is a slice of the U/V/Q/K projection) are read in place.
    x2, u2 = (t.reshape(-1, D) for t in (x, u))
    x2, u2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (x2, u2))
    y = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    rows = x2.shape[0]
    block_d = max(16, triton.next_power_of_2(D))
    # Rows per program: about 4K elements a program on a GPU; a few under the interpreter.
    block_r = max(1, min(64, 4096 // block_d)) if x.device.type == "cuda" else 4
    _ln_gate[(triton.cdiv(rows, block_r),)](
        x2, u2, y, rows, D, x2.stride(0), u2.stride(0), eps, SILU_U=silu_u, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4 if x.device.type == "cuda" else 1,
    )
    return y.view(x.shape)
