"""Fused retrieval: query x item table + history filter + top-K, without the B x N score matrix.

The reference scores every item, masks column 0 (padding) and the history, and runs torch.topk. The Triton
kernel (triton_retrieval.py) keeps, per (query row, chunk of items), only the chunk's best few items, and
a torch.topk over those candidates merges them. It marks, on the device, the rows where a chunk might have
held more of the top-K than it kept; fix_unsure() recomputes those with the reference, so the answer is
exact for any k. The two halves are separate so that compiled callers can capture the first in a CUDA graph
and run the check (one host sync) after it. Tables are fp32/bf16/fp16, or
int8 with per-row fp32 scales (score = query . row * scale).
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

# Widest query the fused kernel holds in one tile; wider ones take the reference.
MAX_TRITON_DIM = 512


def retrieval_top_k_reference(
    query: Tensor, item_table: Tensor, history: Tensor, k: int, scales: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """query [B, D], item_table [N+1, D], history [B, L] -> (scores [B, k] descending, ids [B, k] int64).

    Column 0 and the items of each row's history are never returned above -inf. With int8 tables the scores
    are computed in fp32 and returned in the query's dtype.
    """
    if scales is None:
        scores = query @ item_table.to(query.dtype).T
    else:
        scores = ((query.float() @ item_table.float().T) * scales.float()).to(query.dtype)
    # The extra 0 masks column 0 also for rows without padding.
    scores = scores.scatter(1, F.pad(history, (0, 1)), float("-inf"))
    return torch.topk(scores, k, dim=-1)


def retrieval_key(batch: int, n1: int, dim: int, query_dtype: torch.dtype, table_dtype: torch.dtype, k: int,
                  scaled: bool) -> tuple:
    """The shape key the fused top-K's choice is made and remembered under (pipeline.kernels.dispatch)."""
    from pipeline.kernels.dispatch import batch_bucket

    return (batch_bucket(batch), n1, dim, query_dtype, table_dtype, k, scaled)


@torch.library.custom_op("genrec::retrieval_top_k_candidates", mutates_args=())
def _retrieval_candidates_triton(
    query: Tensor, item_table: Tensor, history: Tensor, k: int, scales: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    from pipeline.kernels.triton_retrieval import fused_top_k

    scores, ids, unsure = fused_top_k(query, item_table, history, k, scales)
    return scores.to(query.dtype), ids, unsure


@_retrieval_candidates_triton.register_fake
def _(query, item_table, history, k, scales):
    B = query.shape[0]
    return (query.new_empty(B, k), query.new_empty(B, k, dtype=torch.int64),
            query.new_empty(B, dtype=torch.bool))


@functools.cache
def _warn_wide(dim: int) -> None:
    log.warning("retrieval: width %d is over the fused kernel's %d; the reference top-K runs instead", dim, MAX_TRITON_DIM)


def _check_k(k: int, item_table: Tensor) -> None:
    if not 1 <= k <= item_table.shape[0] - 1:
        raise ValueError(f"k={k} must be between 1 and the number of items ({item_table.shape[0] - 1})")


def retrieval_top_k_candidates(
    query: Tensor, item_table: Tensor, history: Tensor, k: int, scales: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The op behind the switch, without the exactness check: (scores, ids, unsure [B] bool). Rows marked
    unsure may miss a top-k item; fix_unsure() recomputes them. No host synchronization, so it can run
    inside a CUDA graph; the reference is exact and marks no row."""
    from pipeline.kernels import wants_triton

    _check_k(k, item_table)
    if wants_triton("retrieval", query.device):
        if query.shape[1] <= MAX_TRITON_DIM:
            return torch.ops.genrec.retrieval_top_k_candidates(query, item_table, history, k, scales)
        _warn_wide(query.shape[1])
    scores, ids = retrieval_top_k_reference(query, item_table, history, k, scales)
    return scores, ids, torch.zeros(query.shape[0], dtype=torch.bool, device=query.device)


def needs_check(query: Tensor, item_table: Tensor, k: int, scales: Optional[Tensor] = None) -> bool:
    """Whether candidates of this shape may mark rows unsure, i.e. whether fix_unsure() must read them back.
    False where the dispatch chose the reference (or a config that keeps whole chunks) for this shape, or the
    reference runs anyway: then the exactness check and its host synchronization are skipped."""
    from pipeline.kernels import backend
    from pipeline.kernels.dispatch import choice

    if backend("retrieval") != "triton" or query.shape[1] > MAX_TRITON_DIM:
        return False
    chosen = choice("retrieval", retrieval_key(query.shape[0], item_table.shape[0], query.shape[1], query.dtype,
                                               item_table.dtype, k, scales is not None))
    return chosen is None or not chosen.exact


def fix_unsure(
    query: Tensor, item_table: Tensor, history: Tensor, k: int, scales: Optional[Tensor],
    scores: Tensor, ids: Tensor, unsure: Tensor,
) -> tuple[Tensor, Tensor]:
    """Recompute the unsure rows with the reference. One host synchronization (reading `unsure`)."""
    if not bool(unsure.any()):
        return scores, ids
    rows = unsure.nonzero().squeeze(1)
    ref_scores, ref_ids = retrieval_top_k_reference(query[rows], item_table, history[rows], k, scales)
    scores, ids = scores.clone(), ids.clone()
    scores[rows], ids[rows] = ref_scores.to(scores.dtype), ref_ids
    return scores, ids


def retrieval_top_k(
    query: Tensor, item_table: Tensor, history: Tensor, k: int, scales: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """The op behind the switch (pipeline.kernels.set_backend): same contract as the reference, exact."""
    scores, ids, unsure = retrieval_top_k_candidates(query, item_table, history, k, scales)
    if not needs_check(query, item_table, k, scales):
        return scores, ids
    return fix_unsure(query, item_table, history, k, scales, scores, ids, unsure)
