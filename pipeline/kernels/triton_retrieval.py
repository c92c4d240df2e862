"""Triton side of the fused retrieval (see retrieval.py). Imported only when it runs."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Candidates kept per (row, item block). With random-looking scores a block of 256 items rarely holds more
# than a couple of any row's top 100 out of a million; rows where one might are recomputed exactly.
KEEP_PER_BLOCK = 8


@triton.jit
def _block_top_k(
    Q, T, S, HIST, BOUNDS, OUT_SCORES, OUT_IDS,
    B, N1, D,
    stride_qb, stride_tn, stride_hb, stride_bb, stride_ob,
    HAS_SCALES: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KEEP: tl.constexpr,
):
    # program_id(0) (query blocks) varies fastest, so programs reading the same table block run together.
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    local = tl.arange(0, BLOCK_N)
    cols = pid_n * BLOCK_N + local
    row_ok = rows < B
    col_ok = cols < N1

    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        q = tl.load(Q + rows[:, None] * stride_qb + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        t = tl.load(T + cols[None, :] * stride_tn + dd[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0)
        if UPCAST:
            acc = tl.dot(q.to(tl.float32), t.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(q, t.to(q.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_SCALES:
        acc = acc * tl.load(S + cols, mask=col_ok, other=0.0)[None, :]
    acc = tl.where((col_ok & (cols > 0))[None, :], acc, float("-inf"))

    # History items of this block: HIST is sorted per row and BOUNDS[row, block] indexes its first item
    # in the block, so a block touches only the few history items that fall into it.
    start = tl.load(BOUNDS + rows * stride_bb + pid_n, mask=row_ok, other=0)
    count = tl.load(BOUNDS + rows * stride_bb + pid_n + 1, mask=row_ok, other=0) - start
    for j in range(0, tl.max(count, axis=0)):
        item = tl.load(HIST + rows * stride_hb + start + j, mask=row_ok & (j < count), other=-1)
        acc = tl.where(cols[None, :] == item[:, None], float("-inf"), acc)

    out = rows * stride_ob + pid_n * KEEP
    for i in tl.static_range(KEEP):
        best = tl.max(acc, axis=1)
        arg = tl.argmax(acc, axis=1)
        tl.store(OUT_SCORES + out + i, best, mask=row_ok)
        tl.store(OUT_IDS + out + i, pid_n * BLOCK_N + arg, mask=row_ok)
        acc = tl.where(local[None, :] == arg[:, None], float("-inf"), acc)


def _blocks(batch: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_N, BLOCK_D, num_warps): small batches read the table once, large ones reuse tiles."""
    if batch <= 16:
        return 16, 256, 64, 4
    if batch <= 64:
        return 64, 128, 64, 4
    return 128, 128, 64, 8


def fused_top_k(query: Tensor, item_table: Tensor, history: Tensor, k: int, scales: Tensor | None) -> tuple[Tensor, Tensor]:
    B, D = query.shape
    n1 = item_table.shape[0]
    block_b, block_n, block_d, num_warps = _blocks(B)
    # The interpreter (tests on the CPU): small tiles keep it quick, and its 16-bit dots are wrong
    # (triton 3.9), so tiles go through fp32 there.
    interpreted = query.device.type != "cuda"
    if interpreted:
        block_b, block_n, block_d, num_warps = 16, 32, 16, 1
    num_blocks = triton.cdiv(n1, block_n)
    keep = KEEP_PER_BLOCK
    while num_blocks * keep < k and keep < block_n:
        keep *= 2
    keep = min(keep, block_n)

    query = query.contiguous()
    item_table = item_table.contiguous()
    hist = history.sort(dim=1).values.contiguous()
    edges = (torch.arange(num_blocks + 1, device=query.device) * block_n).expand(B, -1).contiguous()
    bounds = torch.searchsorted(hist, edges).to(torch.int32).contiguous()
    cand_scores = torch.empty(B, num_blocks * keep, device=query.device, dtype=torch.float32)
    cand_ids = torch.empty(B, num_blocks * keep, device=query.device, dtype=torch.int32)
    fp32 = query.dtype == torch.float32
    grid = (triton.cdiv(B, block_b), num_blocks)
    _block_top_k[grid](
        query, item_table, scales if scales is not None else query, hist, bounds, cand_scores, cand_ids,
        B, n1, D,
        query.stride(0), item_table.stride(0), hist.stride(0), bounds.stride(0), cand_scores.stride(0),
        HAS_SCALES=scales is not None, DOT_PRECISION="ieee" if fp32 else None, UPCAST=interpreted,
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d, KEEP=keep, num_warps=num_warps,
    )
    scores, pos = torch.topk(cand_scores, k, dim=1)
    ids = cand_ids.gather(1, pos).long()

    # A block whose smallest kept score beats the k-th best may have dropped a better item than the k-th:
    # recompute those rows exactly. (Dropped items tie at most with a kept one, and ties may go either way.)
    smallest_kept = cand_scores.view(B, num_blocks, keep)[:, :, -1]
    if keep < block_n:
        unsure = (smallest_kept > scores[:, -1:]).any(dim=1)
        if bool(unsure.any()):
            from pipeline.kernels.retrieval import retrieval_top_k_reference

            rows = unsure.nonzero().squeeze(1)
            ref_scores, ref_ids = retrieval_top_k_reference(
                query[rows], item_table, history[rows], k, scales
            )
            scores[rows], ids[rows] = ref_scores.float(), ref_ids
    return scores.to(query.dtype), ids
