"""Triton side of the HSTU attention forward (see hstu_attention.py). Imported only when it runs."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from pipeline.kernels import dispatch
from pipeline.kernels.hstu_attention import hstu_attention_positional


def _configs() -> list[triton.Config]:
    """Tile sizes tried on the first call of each (length, head dims) on a GPU; one under the interpreter."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in [(64, 64, 4, 2), (64, 32, 4, 3), (32, 32, 2, 3), (128, 64, 8, 2), (32, 64, 4, 2),
                               (16, 32, 2, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 4, 2), (128, 128, 8, 2)]]


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    """fp32 sigmoid. FAST: 0.5 + 0.5 tanh(x / 2) with the hardware's tanh.approx, one special-function op
    instead of an exp and a reciprocal (abs error about 3e-4, under bf16/fp16 rounding). The SiLUs are what
    limit this kernel: the scores' and, with silu_inputs, those of every loaded q, k and v tile."""
    if FAST:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x * 0.5], dtype=tl.float32,
                                      is_pure=True, pack=1)
        return 0.5 * t + 0.5
    else:
        return tl.sigmoid(x)


@triton.jit
def _silu(x, FAST: tl.constexpr):
    """SiLU in fp32, rounded back to x's dtype as the eager op rounds its output."""
    xf = x.to(tl.float32)
    return (xf * _sigmoid(xf, FAST)).to(x.dtype)


# PAIRS_BUCKET (batch x heads, rounded up to a power of two) is in the key: the tiles that fill the GPU at
# batch 128 leave it idle at batch 1, so each bucket is tuned once rather than the first batch's choice kept.
@triton.autotune(configs=_configs(), key=["L", "DQK", "DV", "SILU_INPUTS", "FAST", "PAIRS_BUCKET"])
@triton.jit
def _hstu_attention_fwd(
    Q, K, V, PW, LENGTHS, O,
    L, H, DQK, DV, MAX_LEN, inv_max_len, PAIRS_BUCKET,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SILU_INPUTS: tl.constexpr, FAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    length = tl.load(LENGTHS + b).to(tl.int32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dq = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < L
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + dq[None, :],
                mask=m_ok[:, None] & (dq < DQK)[None, :], other=0.0)
    if SILU_INPUTS:
        q = _silu(q, FAST)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    # Keys j <= i and j < length only: the causal and padding masks bound the loop, not just the tile.
    hi = tl.minimum((pid_m + 1) * BLOCK_M, length)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < length
        kt = tl.load(K + b * skb + h * skh + offs_n[None, :] * skl + dq[:, None],
                     mask=n_ok[None, :] & (dq < DQK)[:, None], other=0.0)
        if SILU_INPUTS:
            kt = _silu(kt, FAST)
        if UPCAST:
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        valid = (offs_n[None, :] <= offs_m[:, None]) & n_ok[None, :] & m_ok[:, None]
        bias = tl.load(PW + offs_n[None, :] - offs_m[:, None] + MAX_LEN - 1, mask=valid, other=0.0)
        s = s + bias.to(tl.float32)
        a = tl.where(valid, s * _sigmoid(s, FAST) * inv_max_len, 0.0)
        vt = tl.load(V + b * svb + h * svh + offs_n[:, None] * svl + dv[None, :],
                     mask=n_ok[:, None] & (dv < DV)[None, :], other=0.0)
        if SILU_INPUTS:
            vt = _silu(vt, FAST)
        if UPCAST:
            acc = tl.dot(a.to(vt.dtype).to(tl.float32), vt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(vt.dtype), vt, acc, input_precision=DOT_PRECISION)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + dv[None, :], acc.to(O.dtype.element_ty),
             mask=m_ok[:, None] & (dv < DV)[None, :])


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def fused_attention(q: Tensor, k: Tensor, v: Tensor, position_weight: Tensor, lengths: Tensor, max_len: int,
                    silu_inputs: bool = False) -> Tensor:
    """q, k [B, L, H, dqk], v [B, L, H, dv] (any strides with a unit last one) -> [B, L, H, dv].
    silu_inputs: SiLU is applied to q, k, v as they are loaded."""
    B, L, H, dqk = q.shape
    dv = v.shape[-1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(B, L, H, dv, device=q.device, dtype=v.dtype)
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)  # noqa: E731
    _hstu_attention_fwd[grid](
        q, k, v, position_weight.contiguous(), lengths.contiguous(), out,
        L, H, dqk, dv, max_len, 1.0 / max_len, dispatch.batch_bucket(B * H),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        # The interpreter's 16-bit dots are wrong (triton 3.9): tiles go through fp32 there.
        UPCAST=q.device.type != "cuda", SILU_INPUTS=silu_inputs,
        FAST=q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16),
        BLOCK_DQK=_pow2(dqk), BLOCK_DV=_pow2(dv),
    )
    return out


def attention(q: Tensor, k: Tensor, v: Tensor, position_weight: Tensor, lengths: Tensor, max_len: int,
              silu_inputs: bool = False) -> Tensor:
    """fused_attention, or the reference at shapes where it was timed faster (short histories: a handful of
    programs, each walking its keys alone, against a batched matmul; pipeline.kernels.dispatch)."""
    B, L, H, dqk = q.shape
    key = (dispatch.batch_bucket(B), L, H, dqk, v.shape[-1], q.dtype, silu_inputs)
    args = (q, k, v, position_weight, lengths, max_len, silu_inputs)
    chosen = dispatch.choice("hstu_attention", key) or dispatch.choose(
        "hstu_attention", key, q.device, dispatch.Option(dispatch.REFERENCE, None,
                                                         functools.partial(hstu_attention_positional, *args)),
        [dispatch.Option("triton", None, functools.partial(fused_attention, *args))])
    if chosen.algorithm == dispatch.REFERENCE:
        return hstu_attention_positional(*args)
    return fused_attention(*args)
