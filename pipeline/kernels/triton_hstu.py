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


def _cached_configs() -> list[triton.Config]:
    """Tiles for cached_attention: few queries per row (1-5 appended actions, or a miss's whole history), many
    keys; BLOCK_M 16 is the smallest tile tl.dot takes."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in [(16, 64, 4, 2), (16, 128, 4, 3), (16, 32, 2, 3), (32, 64, 4, 2), (64, 64, 4, 2),
                               (16, 128, 8, 2)]]


@triton.jit
def _cached_block(acc, q, offs_m_pos, m_ok, K, V, row0, count, key0, h, skl, skh, svl, svh, PW, MAX_LEN, inv_max_len,
                  DQK, DV, dq, dv, PT, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr,
                  BLOCK_N: tl.constexpr, PAGE: tl.constexpr):
    """acc += silu(q k^T + bias) / max_len @ v over `count` keys stored from flat row `row0`, whose absolute
    positions start at key0; query i sits at absolute position offs_m_pos[i]. With PAGE > 0, K and V are a
    page pool and flat row r lives in slot PT[r // PAGE] * PAGE + r % PAGE (the keys are read in place)."""
    for start_n in range(0, count, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < count
        rows = row0 + offs_n
        if PAGE > 0:
            rows = tl.load(PT + rows // PAGE, mask=n_ok, other=0) * PAGE + rows % PAGE
        kt = tl.load(K + rows[None, :] * skl + h * skh + dq[:, None],
                     mask=n_ok[None, :] & (dq < DQK)[:, None], other=0.0)
        if UPCAST:
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        key_pos = key0 + offs_n
        valid = (key_pos[None, :] <= offs_m_pos[:, None]) & n_ok[None, :] & m_ok[:, None]
        bias = tl.load(PW + key_pos[None, :] - offs_m_pos[:, None] + MAX_LEN - 1, mask=valid, other=0.0)
        s = s + bias.to(tl.float32)
        a = tl.where(valid, s * _sigmoid(s, FAST) * inv_max_len, 0.0)
        vt = tl.load(V + rows[:, None] * svl + h * svh + dv[None, :],
                     mask=n_ok[:, None] & (dv < DV)[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(a.to(vt.dtype).to(tl.float32), vt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(vt.dtype), vt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.autotune(configs=_cached_configs(), key=["KEYS_BUCKET", "DQK", "DV", "FAST", "PAIRS_BUCKET", "PAGE"])
@triton.jit
def _hstu_cached_attention_fwd(
    Q, KC, VC, KN, VN, C_OFF, C_LEN, N_OFF, N_LEN, Q_OFF, Q_LEN, PW, O, PT,
    H, DQK, DV, MAX_LEN, inv_max_len, KEYS_BUCKET, PAIRS_BUCKET,
    sql, sqh, skcl, skch, svcl, svch, sknl, sknh, svnl, svnh, sol, soh,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    c_off = tl.load(C_OFF + b).to(tl.int64)
    c_len = tl.load(C_LEN + b).to(tl.int32)
    n_off = tl.load(N_OFF + b).to(tl.int64)
    n_len = tl.load(N_LEN + b).to(tl.int32)
    q_off = tl.load(Q_OFF + b).to(tl.int64)
    q_len = tl.load(Q_LEN + b).to(tl.int32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < q_len
    pos = c_len + n_len - q_len + offs_m           # the queries' absolute positions
    dq = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + (q_off + offs_m)[:, None] * sql + h * sqh + dq[None, :],
                mask=m_ok[:, None] & (dq < DQK)[None, :], other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    # Rows with fewer queries than this block's start have nothing to do (the grid covers the longest row).
    # New keys after this block's last query are masked anyway: the causal bound ends the loop (a miss's
    # whole history is all new keys, as in the full kernel).
    block_end = tl.minimum((pid_m + 1) * BLOCK_M, q_len)
    c_count = tl.where(pid_m * BLOCK_M < q_len, c_len, 0)
    n_count = tl.where(pid_m * BLOCK_M < q_len, n_len - q_len + block_end, 0)
    acc = _cached_block(acc, q, pos, m_ok, KC, VC, c_off, c_count, 0, h, skcl, skch, svcl, svch, PW, MAX_LEN,
                        inv_max_len, DQK, DV, dq, dv, PT, DOT_PRECISION, UPCAST, FAST, BLOCK_N, PAGE)
    acc = _cached_block(acc, q, pos, m_ok, KN, VN, n_off, n_count, c_len, h, sknl, sknh, svnl, svnh, PW, MAX_LEN,
                        inv_max_len, DQK, DV, dq, dv, PT, DOT_PRECISION, UPCAST, FAST, BLOCK_N, 0)
    tl.store(O + (q_off + offs_m)[:, None] * sol + h * soh + dv[None, :], acc.to(O.dtype.element_ty),
             mask=m_ok[:, None] & (dv < DV)[None, :])


def fused_cached_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor,
                           c_off: Tensor, c_len: Tensor, n_off: Tensor, n_len: Tensor, q_off: Tensor, q_len: Tensor,
                           position_weight: Tensor, max_len: int, max_keys: int, max_queries: int,
                           page_table: Tensor | None = None, page_size: int = 0) -> Tensor:
    """The kernel: one program per (block of a row's queries, head), walking that row's cached keys and then
    its new ones; each row reads its own keys only. With a page_table, k_cache/v_cache are a page pool read
    in place (hstu_cached_attention.py). -> [Nq, H, dv]."""
    B = c_len.shape[0]
    H, dqk, dv = q.shape[1], q.shape[2], v_new.shape[2]
    q, k_cache, v_cache, k_new, v_new = (t if t.stride(-1) == 1 else t.contiguous()
                                         for t in (q, k_cache, v_cache, k_new, v_new))
    k_cache, v_cache = k_cache.to(k_new.dtype), v_cache.to(v_new.dtype)
    paged = page_table is not None and page_size > 0
    if k_cache.shape[0] == 0:  # a batch of misses: no cached keys, but the kernel wants real pointers
        k_cache, v_cache = k_new[:1], v_new[:1]
    out = torch.empty(q.shape[0], H, dv, device=q.device, dtype=v_new.dtype)
    if B == 0 or q.shape[0] == 0:
        return out
    pt = page_table.contiguous() if paged and page_table.numel() else c_len  # any int64 tensor when unread
    grid = lambda meta: (triton.cdiv(max(max_queries, 1), meta["BLOCK_M"]), B * H)  # noqa: E731
    _hstu_cached_attention_fwd[grid](
        q, k_cache, v_cache, k_new, v_new, c_off.contiguous(), c_len.contiguous(), n_off.contiguous(),
        n_len.contiguous(), q_off.contiguous(), q_len.contiguous(), position_weight.contiguous(), out, pt,
        H, dqk, dv, max_len, 1.0 / max_len, _pow2(max_keys), dispatch.batch_bucket(B * H),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), out.stride(0), out.stride(1),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        UPCAST=q.device.type != "cuda",
        FAST=q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16),
        BLOCK_DQK=_pow2(dqk), BLOCK_DV=_pow2(dv), PAGE=page_size if paged else 0,
    )
    return out


def cached_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor,
                     c_off: Tensor, c_len: Tensor, n_off: Tensor, n_len: Tensor, q_off: Tensor, q_len: Tensor,
                     position_weight: Tensor, max_len: int, max_keys: int, max_queries: int,
                     page_table: Tensor | None = None, page_size: int = 0) -> Tensor:
    """fused_cached_attention, or the reference where that was timed faster (pipeline.kernels.dispatch)."""
    from pipeline.kernels.hstu_cached_attention import cached_attention_reference

    B = c_len.shape[0]
    paged = page_table is not None and page_size > 0
    key = (dispatch.batch_bucket(B), _pow2(max_keys), dispatch.batch_bucket(max(max_queries, 1)), q.shape[1],
           q.shape[2], v_new.shape[2], q.dtype, page_size if paged else 0)
    args = (q, k_cache, v_cache, k_new, v_new, c_off, c_len, n_off, n_len, q_off, q_len, position_weight, max_len,
            max_keys, max_queries)
    reference = functools.partial(cached_attention_reference, *args, page_table=page_table, page_size=page_size)
    chosen = dispatch.choice("hstu_cached_attention", key) or dispatch.choose(
        "hstu_cached_attention", key, q.device, dispatch.Option(dispatch.REFERENCE, None, reference),
        [dispatch.Option("triton", None, functools.partial(fused_cached_attention, *args, page_table, page_size))])
    if chosen.algorithm == dispatch.REFERENCE:
        return reference()
    return fused_cached_attention(*args, page_table, page_size)
