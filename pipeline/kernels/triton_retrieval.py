"""Triton side of the fused retrieval (see retrieval.py). Imported only when it runs.

One program scores a block of query rows against a chunk of the item table, tile by tile, and keeps a
running top-KEEP per row in registers: a tile costs one tensor-core matmul plus as many extraction passes as
the most crowded row of the block has items above its running KEEP-th best (most tiles: none or one). The
program writes its KEEP candidates per row; torch.topk over the candidates (chunks x KEEP per row, a few
thousand) merges them. Nothing is synchronized with the host: `unsure` marks rows where a chunk's KEEP-th
candidate beats the merged k-th, i.e. where the chunk might have dropped a better item; the caller fixes
those rows exactly (retrieval.py), once, at the end of the call.

Block sizes are tuned on the device at the first call of each (batch bucket, items, width, dtypes, k) and
remembered for the process, with the reference top-K among the candidates (pipeline.kernels.dispatch;
GENREC_AUTOTUNE=0: the first candidate, untimed).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from pipeline.kernels import dispatch
from pipeline.kernels.retrieval import retrieval_key, retrieval_top_k_reference

# Candidates kept per (row, chunk) by default (Config.keep). With random-looking scores a chunk of a few
# thousand items out of a million rarely holds more than two or three of any row's top 100; rows where one
# might are recomputed.
KEEP = 8


@triton.jit
def _score_tile(Q, T, S, HIST, rows, row_ok, cols, col_ok, h_start, h_count, h_max, D,
                stride_qb, stride_tn, stride_hb, HAS_SCALES: tl.constexpr, DOT_PRECISION: tl.constexpr,
                UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_B, BLOCK_N] fp32 scores of rows x cols on the tensor cores; column 0, columns past the table and
    each row's history items at -inf."""
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    # BLOCK_D >= D: one step, the query block loaded once per tile from L2; smaller: a pipelined K loop.
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + dd) < D
        q = tl.load(Q + rows[:, None] * stride_qb + d0 + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        tab = tl.load(T + cols[None, :] * stride_tn + d0 + dd[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0)
        if UPCAST:
            acc = tl.dot(q.to(tl.float32), tab.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(q, tab.to(q.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_SCALES:
        acc = acc * tl.load(S + cols, mask=col_ok, other=0.0)[None, :]
    acc = tl.where((col_ok & (cols > 0))[None, :], acc, float("-inf"))
    for j in range(0, h_max):
        item = tl.load(HIST + rows * stride_hb + h_start + j, mask=row_ok & (j < h_count), other=-1)
        acc = tl.where(cols[None, :] == item[:, None], float("-inf"), acc)
    return acc


@triton.jit
def _chunk_top_k(
    Q, T, S, HIST, BOUNDS, OUT_SCORES, OUT_IDS,
    B, N1, D, NUM_TILES,
    stride_qb, stride_tn, stride_hb, stride_bb, stride_ob,
    HAS_SCALES: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TILES_PER_CHUNK: tl.constexpr, KEEP: tl.constexpr,
):
    # program_id(0) (query blocks) varies fastest, so programs reading the same chunk run together.
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    local = tl.arange(0, BLOCK_N)
    slot = tl.arange(0, KEEP)

    # History items of this chunk: HIST is sorted per row and BOUNDS[row, chunk] indexes its first item in
    # the chunk, so a tile checks only the few history items that fall into its chunk.
    h_start = tl.load(BOUNDS + rows * stride_bb + pid_c, mask=row_ok, other=0)
    h_count = tl.load(BOUNDS + rows * stride_bb + pid_c + 1, mask=row_ok, other=0) - h_start
    h_max = tl.max(h_count, axis=0)

    best = tl.full((BLOCK_B, KEEP), float("-inf"), dtype=tl.float32)
    best_ids = tl.zeros((BLOCK_B, KEEP), dtype=tl.int32)
    for t in range(TILES_PER_CHUNK):
        tile = pid_c * TILES_PER_CHUNK + t
        cols = tile * BLOCK_N + local
        col_ok = cols < N1
        acc = _score_tile(Q, T, S, HIST, rows, row_ok, cols, col_ok, h_start, h_count, h_max, D,
                          stride_qb, stride_tn, stride_hb, HAS_SCALES, DOT_PRECISION, UPCAST,
                          BLOCK_B, BLOCK_N, BLOCK_D)

        # Merge the tile into the running top-KEEP: only items above a row's current KEEP-th best can enter,
        # and they enter best first, so the passes needed are the most such items of any row (at most KEEP).
        floor = tl.min(best, axis=1)
        above = tl.sum((acc > floor[:, None]).to(tl.int32), axis=1)
        passes = tl.minimum(tl.max(above, axis=0), KEEP)
        for _ in range(0, passes):
            # One reduction each for the value and its index (the separate max + argmax was two).
            top, arg = tl.max(acc, axis=1, return_indices=True)
            low, low_at = tl.min(best, axis=1, return_indices=True)
            hit = (slot[None, :] == low_at[:, None]) & (top > low)[:, None]
            best = tl.where(hit, top[:, None], best)
            best_ids = tl.where(hit, (tile * BLOCK_N + arg)[:, None], best_ids)
            acc = tl.where(local[None, :] == arg[:, None], float("-inf"), acc)

    out = rows[:, None] * stride_ob + pid_c * KEEP + slot[None, :]
    tl.store(OUT_SCORES + out, best, mask=row_ok[:, None])
    tl.store(OUT_IDS + out, best_ids, mask=row_ok[:, None])


@triton.jit
def _chunk_top_k_buckets(
    Q, T, S, HIST, BOUNDS, OUT_SCORES, OUT_IDS, OUT_BOUND,
    B, N1, D,
    stride_qb, stride_tn, stride_hb, stride_bb, stride_ob, stride_xb,
    HAS_SCALES: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TILES_PER_CHUNK: tl.constexpr, TILE_BITS: tl.constexpr, KEEP: tl.constexpr,
):
    """The running top-K without a reduction per tile. Bucket (row, j) is column j of every tile of the
    chunk; each keeps its best two items elementwise (three max/min per score, no cross-thread work), and
    the tile an item came from rides in its score's low TILE_BITS mantissa bits (a relative change of at
    most 2^(TILE_BITS - 23); all comparisons, the merge's included, see the same packed scores). The query
    block is loaded once (BLOCK_D >= D), so the tile loop is the one Triton pipelines, and a tile costs one
    tensor-core dot and a handful of elementwise operations: column 0 and the table's end are masked only in
    the tiles that hold them, and the history is checked only at the chunk's end, on the KEEP items popped
    from the bucket heads (a seen item popped is dropped; one that crowded a bucket is covered by the bound).
    OUT_BOUND gets, per (row, chunk), an upper bound on every item not kept: the best head left and the
    best third item any bucket saw."""
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    local = tl.arange(0, BLOCK_N)
    slot = tl.arange(0, KEEP)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    q = tl.load(Q + rows[:, None] * stride_qb + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    first = tl.full((BLOCK_B, BLOCK_N), float("-inf"), dtype=tl.float32)
    second = tl.full((BLOCK_B, BLOCK_N), float("-inf"), dtype=tl.float32)
    third = tl.full((BLOCK_B, BLOCK_N), float("-inf"), dtype=tl.float32)
    for t in range(TILES_PER_CHUNK):
        cols = (pid_c * TILES_PER_CHUNK + t) * BLOCK_N + local
        col_ok = cols < N1
        tab = tl.load(T + cols[None, :] * stride_tn + dd[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0)
        if UPCAST:
            acc = tl.dot(q, tab.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(q, tab.to(q.dtype), input_precision=DOT_PRECISION)
        if HAS_SCALES:
            acc = acc * tl.load(S + cols, mask=col_ok, other=0.0)[None, :]
        acc = (acc.to(tl.int32, bitcast=True) & ~((1 << TILE_BITS) - 1) | t).to(tl.float32, bitcast=True)
        if (pid_c * TILES_PER_CHUNK + t == 0) | ((pid_c * TILES_PER_CHUNK + t + 1) * BLOCK_N > N1):
            acc = tl.where((col_ok & (cols > 0))[None, :], acc, float("-inf"))  # after packing: -inf stays
        third = tl.maximum(third, tl.minimum(acc, second))
        second = tl.maximum(second, tl.minimum(acc, first))
        first = tl.maximum(first, acc)

    h_start = tl.load(BOUNDS + rows * stride_bb + pid_c, mask=row_ok, other=0)
    h_count = tl.load(BOUNDS + rows * stride_bb + pid_c + 1, mask=row_ok, other=0) - h_start
    h_max = tl.max(h_count, axis=0)
    best = tl.full((BLOCK_B, KEEP), float("-inf"), dtype=tl.float32)
    best_ids = tl.zeros((BLOCK_B, KEEP), dtype=tl.int32)
    for s in tl.static_range(KEEP):
        top, arg = tl.max(first, axis=1, return_indices=True)
        item = (pid_c * TILES_PER_CHUNK + (top.to(tl.int32, bitcast=True) & ((1 << TILE_BITS) - 1))) * BLOCK_N + arg
        for j in range(0, h_max):
            seen = tl.load(HIST + rows * stride_hb + h_start + j, mask=row_ok & (j < h_count), other=-1)
            top = tl.where(item == seen, float("-inf"), top)
        best = tl.where(slot[None, :] == s, top[:, None], best)
        best_ids = tl.where(slot[None, :] == s, item[:, None], best_ids)
        popped = local[None, :] == arg[:, None]
        first = tl.where(popped, second, first)
        second = tl.where(popped, float("-inf"), second)
    bound = tl.maximum(tl.max(first, axis=1), tl.max(third, axis=1))

    out = rows[:, None] * stride_ob + pid_c * KEEP + slot[None, :]
    tl.store(OUT_SCORES + out, best, mask=row_ok[:, None])
    tl.store(OUT_IDS + out, best_ids, mask=row_ok[:, None])
    tl.store(OUT_BOUND + rows * stride_xb + pid_c, bound, mask=row_ok)


@triton.jit
def _chunk_top_k_gemv(
    Q, T, S, HIST, BOUNDS, OUT_SCORES, OUT_IDS,
    B, N1, D,
    stride_qb, stride_tn, stride_hb, stride_bb, stride_ob,
    HAS_SCALES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TILES_PER_CHUNK: tl.constexpr, KEEP: tl.constexpr,
):
    """One query row per program, scored on the CUDA cores: for a handful of rows the table read is the
    whole cost, and a [16, D] tensor-core tile would waste 15 of its rows."""
    row = tl.program_id(0)
    pid_c = tl.program_id(1)
    local = tl.arange(0, BLOCK_N)
    slot = tl.arange(0, KEEP)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    q = tl.load(Q + row * stride_qb + dd, mask=d_ok, other=0.0).to(tl.float32)
    h_start = tl.load(BOUNDS + row * stride_bb + pid_c)
    h_count = tl.load(BOUNDS + row * stride_bb + pid_c + 1) - h_start
    best = tl.full((KEEP,), float("-inf"), dtype=tl.float32)
    best_ids = tl.zeros((KEEP,), dtype=tl.int32)
    for t in range(TILES_PER_CHUNK):
        tile = pid_c * TILES_PER_CHUNK + t
        cols = tile * BLOCK_N + local
        col_ok = cols < N1
        tab = tl.load(T + cols[:, None] * stride_tn + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0)
        acc = tl.sum(tab.to(tl.float32) * q[None, :], axis=1)
        if HAS_SCALES:
            acc = acc * tl.load(S + cols, mask=col_ok, other=0.0)
        acc = tl.where(col_ok & (cols > 0), acc, float("-inf"))
        for j in range(0, h_count):
            item = tl.load(HIST + row * stride_hb + h_start + j)
            acc = tl.where(cols == item, float("-inf"), acc)
        floor = tl.min(best, axis=0)
        passes = tl.minimum(tl.sum((acc > floor).to(tl.int32), axis=0), KEEP)
        for _ in range(0, passes):
            top, arg = tl.max(acc, axis=0, return_indices=True)
            low, low_at = tl.min(best, axis=0, return_indices=True)
            # Only above the current floor: an earlier pass of this tile may have raised it past `top`.
            hit = slot == tl.where(top > low, low_at, -1)
            best = tl.where(hit, top, best)
            best_ids = tl.where(hit, tile * BLOCK_N + arg, best_ids)
            acc = tl.where(local == arg, float("-inf"), acc)
    out = row * stride_ob + pid_c * KEEP + slot
    tl.store(OUT_SCORES + out, best)
    tl.store(OUT_IDS + out, best_ids)


@triton.jit
def _order_key(x):
    """fp32 -> int32 whose signed order is the floats' order (negative floats: their magnitudes reversed).
    The same map on the int32 undoes it."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _merge(CAND_SCORES, CAND_IDS, OUT_SCORES, OUT_IDS, UNSURE, BOUND, C, K, NUM_CHUNKS, stride_c, stride_o,
           stride_x, KEEP: tl.constexpr, BLOCK_C: tl.constexpr, CHECK: tl.constexpr, BLOCK_X: tl.constexpr):
    """One row per program, in place of torch.topk over the candidates plus the unsure check (a few kernels,
    43 us at b=1 on the H200): each score becomes an order-preserving int32 key, packed with its slot into
    an int64, and one in-register sort (descending) puts the row's top K first."""
    row = tl.program_id(0)
    slot = tl.arange(0, BLOCK_C)
    scores = tl.load(CAND_SCORES + row * stride_c + slot, mask=slot < C, other=float("-inf"))
    key = _order_key(scores)
    packed = tl.sort((key.to(tl.int64) << 32) | slot.to(tl.int64), descending=True)
    top_key = (packed >> 32).to(tl.int32)
    top_slot = (packed & 0xFFFFFFFF).to(tl.int32)
    top_bits = top_key ^ ((top_key >> 31) & 0x7FFFFFFF)  # the same map is its own inverse
    first = slot < K
    tl.store(OUT_SCORES + row * stride_o + slot, top_bits.to(tl.float32, bitcast=True), mask=first)
    ids = tl.load(CAND_IDS + row * stride_c + top_slot, mask=first & (top_slot < C), other=0)
    tl.store(OUT_IDS + row * stride_o + slot, ids.to(tl.int64), mask=first)
    kth = tl.max(tl.where(slot == K - 1, top_key, -2147483647 - 1), axis=0)
    if BLOCK_X > 0:
        # The chunks' bounds on what they dropped (the bucket kernel) against the k-th, in key space.
        chunk = tl.arange(0, BLOCK_X)
        bound_key = _order_key(tl.load(BOUND + row * stride_x + chunk, mask=chunk < NUM_CHUNKS, other=float("-inf")))
        tl.store(UNSURE + row, tl.max((bound_key > kth).to(tl.int32), axis=0) > 0)
    elif CHECK:
        # The chunks' smallest kept keys against the k-th: as the torch path's check, in key space.
        lowest = tl.min(tl.reshape(key, (BLOCK_C // KEEP, KEEP)), axis=1)
        chunk_ok = tl.arange(0, BLOCK_C // KEEP) * KEEP < C
        tl.store(UNSURE + row, tl.max((chunk_ok & (lowest > kth)).to(tl.int32), axis=0) > 0)


# The merge kernel holds a row's candidates in registers: rows with more take torch.topk.
MAX_MERGE = 8192


@dataclass(frozen=True)
class Config:
    block_b: int              # query rows per program; 1: the CUDA-core kernel (_chunk_top_k_gemv)
    block_n: int
    tiles_per_chunk: int
    num_warps: int
    num_stages: int
    block_d: int = 0          # width step of the "passes" kernel; 0: the whole width at once
    keep: int = KEEP          # candidates kept per (row, chunk): fewer make the merge cheaper
    merge: str = "torch"      # torch: torch.topk over the candidates; triton: _merge (up to MAX_MERGE per row)
    buckets: bool = False     # tensor-core kernel only: _chunk_top_k_buckets in place of extraction passes

    @property
    def algorithm(self) -> str:
        """The kernel this config runs: gemv (one row per program), buckets or passes (tensor cores)."""
        return "gemv" if self.block_b == 1 else "buckets" if self.buckets else "passes"


# Candidates per batch regime, the default first (what the H200's tuner chose; used untimed with
# GENREC_AUTOTUNE=0 or inside a CUDA-graph capture). Small batches must stream the table at full bandwidth
# (many programs, short chunks); large ones are matmul-bound, where the bucket kernel's elementwise top-2
# beat the extraction passes 2.2x at b=1024. A "threshold" algorithm (a lower bound from a prefix of
# the table, then an atomic append of every item above it) lost to these by 1.6x to 2.2x at every batch
# size on the H100 (docs/BENCHMARKS.md, 2026-11-28) and was removed; so was a two-pass "bound" algorithm
# (tile maxima bound each row's k-th score, then the same append), which lost at every size on the H200.
_CANDIDATES = {
    "tiny": [Config(1, 32, 32, 4, 3, 0, 4),  # the H200's choice (2026-11-28)
             Config(1, 64, 16, 4, 3), Config(1, 32, 32, 4, 3), Config(1, 128, 8, 8, 3), Config(1, 64, 4, 4, 2),
             Config(1, 16, 64, 2, 3), Config(16, 128, 8, 4, 3), Config(16, 64, 16, 4, 3, 64),
             # Half the candidates: the merge (torch.topk over them) took 43 us of 0.31 ms at b=1 on the H200.
             Config(1, 64, 16, 4, 3, 0, 4), Config(1, 32, 64, 4, 3, 0, 4),
             # Our merge kernel in place of torch.topk (not yet timed on a GPU: the tuner decides).
             Config(1, 64, 16, 4, 3, 0, 4, "triton"), Config(1, 32, 32, 4, 3, 0, 4, "triton"),
             Config(1, 32, 32, 4, 3, 0, 8, "triton")],
    "small": [Config(16, 128, 16, 8, 2, 0, 8, "torch", True),  # the H200's choice (2026-11-28)
              Config(16, 128, 8, 4, 3), Config(16, 128, 1, 4, 2), Config(16, 256, 4, 8, 3),
              Config(16, 64, 16, 4, 3), Config(16, 128, 32, 4, 3), Config(16, 128, 8, 4, 3, 64),
              Config(16, 64, 16, 4, 4, 64), Config(1, 64, 16, 4, 3), Config(16, 64, 16, 4, 3, 0, 8, "triton"),
              Config(16, 128, 8, 4, 3, 64, 8, "triton"),
              # The bucket kernel (_chunk_top_k_buckets, always the whole width at once).
              Config(16, 128, 16, 4, 2, 0, 8, "triton", True), Config(16, 64, 16, 4, 3, 0, 8, "torch", True),
              Config(16, 64, 32, 4, 3, 0, 8, "triton", True)],
    "medium": [Config(64, 64, 16, 4, 3, 0, 8, "torch", True),  # the H200's choice (2026-11-28)
               Config(64, 128, 16, 4, 3), Config(64, 128, 64, 8, 3), Config(128, 128, 16, 8, 3),
               Config(32, 128, 16, 4, 3), Config(64, 128, 16, 4, 3, 64), Config(128, 128, 16, 8, 3, 64),
               Config(64, 256, 8, 8, 3, 64), Config(64, 128, 16, 4, 3, 64, 8, "triton"),
               Config(64, 128, 16, 8, 2, 0, 8, "torch", True), Config(64, 128, 16, 8, 2, 0, 8, "triton", True),
               Config(64, 64, 16, 8, 3, 0, 8, "torch", True), Config(32, 128, 16, 4, 2, 0, 8, "torch", True),
               Config(128, 64, 16, 8, 3, 0, 8, "torch", True)],
    "large": [Config(128, 32, 32, 8, 3, 0, 8, "torch", True),  # the H200's choice (docs/benchmarks-log.md)
              Config(64, 64, 32, 4, 2, 0, 8, "torch", True),  # 0.2% behind it
              Config(128, 64, 16, 8, 3, 0, 8, "torch", True),  # the choice before: 2.09 ms against 1.84
              Config(128, 128, 32, 8, 3), Config(128, 128, 32, 8, 3, 64), Config(128, 128, 128, 8, 3, 64),
              Config(128, 256, 16, 8, 3, 64), Config(64, 128, 64, 4, 3, 64), Config(128, 64, 64, 4, 3, 64),
              Config(128, 128, 64, 4, 4, 32), Config(64, 256, 32, 8, 3, 64),
              Config(64, 128, 64, 4, 3, 64, 8, "triton"),
              Config(64, 128, 16, 8, 2, 0, 8, "torch", True), Config(64, 128, 32, 8, 2, 0, 8, "torch", True),
              Config(64, 64, 16, 8, 3, 0, 8, "torch", True), Config(64, 64, 32, 4, 3, 0, 8, "torch", True),
              Config(128, 64, 16, 8, 2, 0, 8, "torch", True),
              Config(64, 128, 16, 8, 2, 0, 8, "triton", True),
              # Around the earlier choice (128, 64, 16, 8 warps, 3 stages); timed on the H200 (docs/benchmarks-log.md).
              Config(128, 64, 16, 8, 4, 0, 8, "torch", True), Config(128, 64, 16, 4, 3, 0, 8, "torch", True),
              Config(256, 32, 16, 8, 3, 0, 8, "torch", True),
              # Two programs per multiprocessor (64 rows, 2 stages: half the registers and shared memory of
              # (128, 64, 16)), so that one's SIMT work may overlap the other's matmul (ncu of (128, 64, 16):
              # 8 warps per SM, 0.68 of 2 eligible per scheduler, the integer/logic pipe the busiest).
              Config(64, 64, 16, 4, 2, 0, 8, "torch", True),
              # Longer chunks (fewer candidates to merge, fewer pops per item) around the two best; not yet timed.
              Config(128, 32, 64, 8, 3, 0, 8, "torch", True), Config(64, 64, 64, 4, 2, 0, 8, "torch", True),
              Config(64, 32, 64, 4, 2, 0, 8, "torch", True), Config(128, 32, 32, 8, 4, 0, 8, "torch", True)],
}
# The interpreter (tests on the CPU): small tiles keep it quick, and chunks of two tiles exercise the merge.
_INTERPRETED = Config(16, 32, 2, 1, 1)
_INTERPRETED_EXACT = Config(1, 32, 2, 1, 1, 0, 64)  # keeps all 64 items of a chunk: never unsure
# Every timing of a kernel config the tuner took, for the bench's record: (key, config, ms per call of
# candidates(), the exactness check's cost included where the config left rows unsure). The reference's
# timings and the choice per shape: pipeline.kernels.dispatch.
TUNING_LOG: list[tuple[tuple, Config, float]] = []


def _regime(batch: int) -> str:
    return "tiny" if batch <= 4 else "small" if batch <= 16 else "medium" if batch <= 128 else "large"


def _shape(cfg: Config, n1: int, k: int) -> tuple[int, int, int]:
    """-> (tiles per chunk, chunks, keep): chunks shrink, then keep grows, until chunks x keep >= k."""
    num_tiles = triton.cdiv(n1, cfg.block_n)
    tpc = min(cfg.tiles_per_chunk, num_tiles)
    keep = cfg.keep
    while triton.cdiv(num_tiles, tpc) * keep < k and tpc > 1:
        tpc //= 2
    while triton.cdiv(num_tiles, tpc) * keep < k:
        keep *= 2
    return tpc, triton.cdiv(num_tiles, tpc), keep


@triton.jit
def _sort_history(H, HIST, BOUNDS, L, NUM_EDGES, CHUNK, stride_h, stride_s, stride_b,
                  BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program (row, e): for chunk edges e * BLOCK_E ... of the row, the number of history items below each
    edge (edge * CHUNK), i.e. the index of the chunk's first item in the sorted row; program (row, 0) also
    writes the row sorted (int32). The edges are split over programs because one row has about a thousand
    of them at batch 1, which one program took 18 us to count."""
    row = tl.program_id(0)
    e0 = tl.program_id(1) * BLOCK_E
    offs = tl.arange(0, BLOCK_L)
    items = tl.load(H + row * stride_h + offs, mask=offs < L, other=2147483647).to(tl.int32)
    if e0 == 0:
        tl.store(HIST + row * stride_s + offs, tl.sort(items), mask=offs < L)
    edges = e0 + tl.arange(0, BLOCK_E)
    below = tl.sum((items[None, :] < (edges * CHUNK)[:, None]).to(tl.int32), axis=1)
    tl.store(BOUNDS + row * stride_b + edges, below, mask=edges < NUM_EDGES)


def _history_bounds(history: Tensor, num_chunks: int, chunk: int) -> tuple[Tensor, Tensor]:
    """-> (each row's history sorted, int32, [B, chunks + 1] index of its first item in each chunk).

    One small kernel in place of torch's sort + searchsorted: the segmented radix sort of int64 rows took
    27 us at batch 1 on the H100, a tenth of the whole top-K."""
    B, L = history.shape
    history = history if history.stride(-1) == 1 else history.contiguous()
    hist = torch.empty(B, L, device=history.device, dtype=torch.int32)
    bounds = torch.empty(B, num_chunks + 1, device=history.device, dtype=torch.int32)
    if B and L:
        grid = (B, triton.cdiv(num_chunks + 1, 64))
        _sort_history[grid](history, hist, bounds, L, num_chunks + 1, chunk,
                            history.stride(0), hist.stride(0), bounds.stride(0),
                            BLOCK_L=max(16, triton.next_power_of_2(L)), BLOCK_E=64,
                            num_warps=4 if history.device.type == "cuda" else 1)
    else:
        bounds.zero_()
    return hist, bounds


def candidates(query: Tensor, item_table: Tensor, history: Tensor, k: int, scales: Tensor | None,
               cfg: Config) -> tuple[Tensor, Tensor, Tensor]:
    """-> (scores fp32 [B, k] descending, ids int64 [B, k], unsure bool [B]). No host synchronization."""
    B, D = query.shape
    n1 = item_table.shape[0]
    interpreted = query.device.type != "cuda"
    tpc, num_chunks, keep = _shape(cfg, n1, k)
    chunk = tpc * cfg.block_n

    query = query.contiguous()
    item_table = item_table.contiguous()
    hist, bounds = _history_bounds(history, num_chunks, chunk)
    cand_scores = torch.empty(B, num_chunks * keep, device=query.device, dtype=torch.float32)
    cand_ids = torch.empty(B, num_chunks * keep, device=query.device, dtype=torch.int32)
    grid = (triton.cdiv(B, cfg.block_b), num_chunks)
    args = (query, item_table, scales if scales is not None else query, hist, bounds, cand_scores, cand_ids, B, n1, D)
    strides = (query.stride(0), item_table.stride(0), hist.stride(0), bounds.stride(0), cand_scores.stride(0))
    full_width = max(16, triton.next_power_of_2(D))
    bound = None
    if cfg.algorithm == "buckets":
        bound = torch.empty(B, num_chunks, device=query.device, dtype=torch.float32)
        _chunk_top_k_buckets[grid](
            *args[:7], bound, *args[7:], *strides, bound.stride(0),
            HAS_SCALES=scales is not None, DOT_PRECISION="ieee" if query.dtype == torch.float32 else None,
            UPCAST=interpreted,
            BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_D=full_width,
            TILES_PER_CHUNK=tpc, TILE_BITS=max(1, (tpc - 1).bit_length()), KEEP=keep,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    elif cfg.algorithm == "gemv":
        _chunk_top_k_gemv[grid](
            *args, *strides, HAS_SCALES=scales is not None, BLOCK_N=cfg.block_n, BLOCK_D=full_width,
            TILES_PER_CHUNK=tpc, KEEP=keep, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        _chunk_top_k[grid](
            *args, triton.cdiv(n1, cfg.block_n), *strides,
            HAS_SCALES=scales is not None, DOT_PRECISION="ieee" if query.dtype == torch.float32 else None,
            # The interpreter's 16-bit dots are wrong (triton 3.9): tiles go through fp32 there.
            UPCAST=interpreted,
            BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_D=min(cfg.block_d or full_width, full_width),
            TILES_PER_CHUNK=tpc, KEEP=keep, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if cfg.merge == "triton" and num_chunks * keep <= MAX_MERGE:
        scores = torch.empty(B, k, device=query.device, dtype=torch.float32)
        ids = torch.empty(B, k, device=query.device, dtype=torch.int64)
        unsure = torch.zeros(B, device=query.device, dtype=torch.bool)
        _merge[(B,)](cand_scores, cand_ids, scores, ids, unsure, bound if bound is not None else cand_scores,
                     num_chunks * keep, k, num_chunks, cand_scores.stride(0), scores.stride(0),
                     bound.stride(0) if bound is not None else 0, KEEP=keep,
                     BLOCK_C=triton.next_power_of_2(num_chunks * keep), CHECK=keep < chunk,
                     BLOCK_X=triton.next_power_of_2(num_chunks) if bound is not None else 0,
                     num_warps=8 if not interpreted else 1)
        return scores, ids, unsure
    scores, pos = torch.topk(cand_scores, k, dim=1)
    ids = cand_ids.gather(1, pos).long()
    if bound is not None:  # the bucket kernel's bounds on what each chunk dropped
        unsure = (bound > scores[:, -1:]).any(dim=1)
    elif keep >= chunk:  # every item of every chunk was kept
        unsure = torch.zeros(B, dtype=torch.bool, device=query.device)
    else:
        # A chunk whose smallest kept score beats the k-th best may have dropped a better item than the
        # k-th. (Dropped items tie at most with a kept one, and ties may go either way.)
        smallest_kept = cand_scores.view(B, num_chunks, keep).amin(dim=2)
        unsure = (smallest_kept > scores[:, -1:]).any(dim=1)
    return scores, ids, unsure


def config_for(query: Tensor, item_table: Tensor, history: Tensor, k: int, scales: Tensor | None) -> Config | str:
    """The config for this call's shape, or dispatch.REFERENCE where the reference top-K was timed faster:
    the reference and the candidates are timed on the first call of a shape (pipeline.kernels.dispatch)."""
    B, D = query.shape
    n1 = item_table.shape[0]
    key = retrieval_key(B, n1, D, query.dtype, item_table.dtype, k, scales is not None)
    found = dispatch.choice("retrieval", key)
    if found is not None:  # the common case: no closures built per call
        return found.config if found.algorithm != dispatch.REFERENCE else dispatch.REFERENCE
    if query.device.type == "cuda":
        configs = _CANDIDATES[_regime(B)]
    else:  # the interpreter: one config that may leave rows unsure, one that keeps every item of a chunk
        configs = [_INTERPRETED, _INTERPRETED_EXACT]
    reference = dispatch.Option(dispatch.REFERENCE, None,
                                lambda: reference_candidates(query, item_table, history, k, scales))
    options = [dispatch.Option(cfg.algorithm, cfg, functools.partial(candidates, query, item_table, history, k,
                                                                     scales, cfg), exact=_exact(cfg, n1, k))
               for cfg in _distinct(configs, n1, k, D)]
    before = len(dispatch.TUNING_LOG)
    chosen = dispatch.choose("retrieval", key, query.device, reference, options, penalty=_unsure_penalty)
    TUNING_LOG.extend((key, cfg, ms + extra) for op, _, algorithm, cfg, ms, extra in dispatch.TUNING_LOG[before:]
                      if algorithm != dispatch.REFERENCE)
    return chosen.config if chosen.algorithm != dispatch.REFERENCE else dispatch.REFERENCE


def _unsure_penalty(option: dispatch.Option, reference_ms: float) -> float:
    """A config that leaves a row of the tuning call unsure costs the exactness check's recomputation on top:
    about the reference's time (it reads the whole table again), plus a host round trip. On small tables
    with a large k most rows are unsure (a chunk holds more of the top-k than it keeps), so such a config
    is slower than the reference alone, whatever its own time."""
    if option.exact:
        return 0.0
    return reference_ms if bool(option.run()[2].any()) else 0.0


def _exact(cfg: Config, n1: int, k: int) -> bool:
    """Whether cfg keeps every item of each chunk, so that it never marks a row unsure."""
    tpc, _, keep = _shape(cfg, n1, k)
    return not cfg.buckets and keep >= tpc * cfg.block_n


def _distinct(configs: list[Config], n1: int, k: int, dim: int) -> list[Config]:
    """The configs that launch differently at this shape, in order: on a small table many shrink to the same
    chunks (each would be a Triton compile and a timing for nothing)."""
    seen, out = set(), []
    full_width = max(16, triton.next_power_of_2(dim))
    for cfg in configs:
        tpc, chunks, keep = _shape(cfg, n1, k)
        merge = cfg.merge if chunks * keep <= MAX_MERGE else "torch"
        launch = (cfg.algorithm, cfg.block_b, cfg.block_n, tpc, keep, min(cfg.block_d or full_width, full_width),
                  cfg.num_warps, cfg.num_stages, merge)
        if launch not in seen:
            seen.add(launch)
            out.append(cfg)
    return out


def reference_candidates(query: Tensor, item_table: Tensor, history: Tensor, k: int,
                         scales: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The reference top-K in candidates()' form: exact, so no row is unsure."""
    scores, ids = retrieval_top_k_reference(query, item_table, history, k, scales)
    return scores, ids, torch.zeros(query.shape[0], dtype=torch.bool, device=query.device)


def fused_top_k(query: Tensor, item_table: Tensor, history: Tensor, k: int, scales: Tensor | None,
                cfg: Config | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """candidates() with the config chosen for this shape, or the reference where it was chosen."""
    cfg = cfg or config_for(query, item_table, history, k, scales)
    if cfg == dispatch.REFERENCE:
        return reference_candidates(query, item_table, history, k, scales)
    return candidates(query, item_table, history, k, scales, cfg)
