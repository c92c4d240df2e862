"""Fused retrieval: query x item table + history filter + top-K, without the B x N score matrix.

The reference scores every item, masks column 0 (padding) and the history, and runs torch.topk. The Triton
kernel (triton_retrieval.py) keeps, per (query row, block of items), only the block's best few items, and
a torch.topk over those candidates merges them; rows where a block might have held more of the top-K than
it kept are recomputed by the reference, so the answer is exact for any k. Tables are fp32/bf16/fp16, or
int8 with per-row fp32 scales (score = query . row * scale).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


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


@torch.library.custom_op("genrec::retrieval_top_k", mutates_args=())
def _retrieval_top_k_triton(
    query: Tensor, item_table: Tensor, history: Tensor, k: int, scales: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    from pipeline.kernels.triton_retrieval import fused_top_k

    return fused_top_k(query, item_table, history, k, scales)


@_retrieval_top_k_triton.register_fake
def _(query, item_table, history, k, scales):
    return query.new_empty(query.shape[0], k), query.new_empty(query.shape[0], k, dtype=torch.int64)


def retrieval_top_k(
    query: Tensor, item_table: Tensor, history: Tensor, k: int, scales: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """The op behind the switch (pipeline.kernels.set_backend): same contract as the reference."""
    from pipeline.kernels import wants_triton

    if not 1 <= k <= item_table.shape[0] - 1:
        raise ValueError(f"k={k} must be between 1 and the number of items ({item_table.shape[0] - 1})")
    if wants_triton("retrieval", query.device):
        return torch.ops.genrec.retrieval_top_k(query, item_table, history, k, scales)
    return retrieval_top_k_reference(query, item_table, history, k, scales)
