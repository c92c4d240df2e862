"""The retrieval head every variant answers with: padded histories (+ lengths) -> top-K item ids and
scores over the whole item table, items already in the history filtered out."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import kernels


def last_position(seq_emb: Tensor, lengths: Tensor) -> Tensor:
    """[B, L, D], [B] -> [B, D]: the embedding at position length-1, the latest action."""
    index = (lengths - 1).view(-1, 1, 1).expand(-1, 1, seq_emb.size(-1))
    return seq_emb.gather(1, index).squeeze(1)


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


def mask_history(scores: Tensor, history: Tensor) -> Tensor:
    """scores [B, N+1] -> copy with column 0 (padding) and every item of history [B, L] at -inf."""
    # The extra 0 masks column 0 also for rows without padding.
    return scores.scatter(1, F.pad(history, (0, 1)), float("-inf"))


def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """-> (scores [B, k] descending, item ids [B, k] int64). The order among equal scores is unspecified."""
    return torch.topk(scores, k, dim=-1)


def padded_ids(ids: Tensor, scores: Tensor) -> Tensor:
    """Slots at -inf (fewer than k unseen items) answer id 0, padding, rather than whatever was masked."""
    return torch.where(torch.isneginf(scores), torch.zeros_like(ids), ids)


class Retriever(nn.Module):
    """The call every variant answers: padded histories (+lengths) -> top-K item ids and scores,
    already-seen items filtered.

    When fewer than k items are left after filtering, the remaining slots hold id 0 (padding) with score
    -inf rather than a seen item.

    For serving, freeze() stores the normalized item table once (after .to(dtype)) instead of normalizing
    the whole table on every call; a frozen retriever must not be trained further.
    """

    def __init__(self, encoder: nn.Module, k: int, l2_norm: bool = True) -> None:
        super().__init__()
        num_items = encoder.item_embeddings().size(0) - 1
        if not 1 <= k <= num_items:
            raise ValueError(f"k={k} must be between 1 and the number of items ({num_items})")
        self.encoder, self.k, self.l2_norm = encoder, k, l2_norm
        self.register_buffer("frozen_table", None, persistent=False)
        self.register_buffer("table_scales", None, persistent=False)

    @torch.no_grad()
    def freeze(self, int8_table: bool = False) -> "Retriever":
        """Precompute the scoring table in the current dtype and device (call it after .to()); returns self.

        int8_table: store it as int8 with one fp32 scale per row (symmetric, max-abs / 127), half the bytes
        of bf16 to read per query; scores are (query . row) * scale, computed in fp32.
        """
        table = self.encoder.item_embeddings()
        table = l2_normalize(table) if self.l2_norm else table.clone()
        if int8_table:
            scales = table.float().abs().amax(dim=1).clamp(min=1e-12) / 127
            self.frozen_table = (table.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
            self.table_scales = scales
        else:
            self.frozen_table, self.table_scales = table, None
        return self

    def table(self, dtype: torch.dtype) -> Tensor:
        """[N+1, D] the table queries are scored against: the item embeddings, L2-normalized if l2_norm
        (int8 when frozen so; see table_scales)."""
        if self.frozen_table is not None:
            return self.frozen_table if self.table_scales is not None else self.frozen_table.to(dtype)
        table = self.encoder.item_embeddings().to(dtype)
        return l2_normalize(table) if self.l2_norm else table

    def query(self, history: Tensor, lengths: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """[B, D]: the encoder's output at each row's last position, L2-normalized if l2_norm."""
        encode_last = getattr(self.encoder, "encode_last", None)
        if encode_last is not None:
            query = encode_last(history, lengths, timestamps)
        else:
            query = last_position(self.encoder(history, lengths, timestamps), lengths)
        return l2_normalize(query) if self.l2_norm else query

    def score_all(self, history: Tensor, lengths: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """-> [B, N+1] scores of every item, column 0 and history items at -inf (for full-ranking evaluation)."""
        return self.score_all_for(self.query(history, lengths, timestamps), history)

    def score_all_for(self, query: Tensor, history: Tensor) -> Tensor:
        """score_all for queries computed elsewhere (query(), or incremental encoding) -> [B, N+1]."""
        if self.table_scales is not None:
            scores = ((query.float() @ self.table(query.dtype).float().T) * self.table_scales).to(query.dtype)
        else:
            scores = query @ self.table(query.dtype).T
        return mask_history(scores, history)

    def candidates(self, history: Tensor, lengths: Tensor, timestamps: Tensor | None = None):
        """-> (ids, scores, unsure [B], query): forward() before its exactness check. With the Triton
        retrieval kernel, rows marked unsure may miss a top-k item (finish() fixes them); nothing here
        synchronizes with the host, so compiled callers can capture it whole in a CUDA graph."""
        return self.candidates_for(self.query(history, lengths, timestamps), history)

    def candidates_for(self, query: Tensor, history: Tensor):
        """candidates() for queries computed elsewhere."""
        table, scales = self.table(query.dtype), self.table_scales
        if kernels.backend("retrieval") == "triton":
            scores, ids, unsure = kernels.retrieval_top_k_candidates(query, table, history, self.k, scales)
        else:
            scores, ids = kernels.retrieval_top_k_reference(query, table, history, self.k, scales)
            unsure = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        return padded_ids(ids, scores), scores, unsure, query

    def finish(self, history: Tensor, ids: Tensor, scores: Tensor, unsure: Tensor, query: Tensor,
               any_unsure: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """candidates() -> the exact (ids, scores): unsure rows recomputed (one host sync, skipped where the
        kernels' dispatch ran the reference or an exact config for this shape). any_unsure: unsure.any(), if
        the caller already queued it."""
        table = self.table(query.dtype)
        if not kernels.needs_check(query, table, self.k, self.table_scales):
            return ids, scores
        if not bool(unsure.any() if any_unsure is None else any_unsure):  # the common case: nothing recomputed
            return ids, scores
        scores, ids = kernels.fix_unsure(query, table, history, self.k, self.table_scales, scores, ids, unsure)
        return padded_ids(ids, scores), scores

    def forward(self, history: Tensor, lengths: Tensor, timestamps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """history, lengths[, timestamps] -> (item ids [B, k] int64, scores [B, k])."""
        if kernels.backend("retrieval") == "triton":
            ids, scores, unsure, query = self.candidates(history, lengths, timestamps)
            return self.finish(history, ids, scores, unsure, query)
        scores, ids = top_k(self.score_all(history, lengths, timestamps), self.k)
        return padded_ids(ids, scores), scores

    def rank(self, query: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        """forward() from the query on: queries [B, D] (already L2-normalized if l2_norm, as query() returns
        them) and the histories to filter -> (item ids [B, k], scores [B, k]). For callers that obtain the
        query another way (pipeline.serving.kvcache: incremental encoding)."""
        if kernels.backend("retrieval") == "triton":
            ids, scores, unsure, query = self.candidates_for(query, history)
            return self.finish(history, ids, scores, unsure, query)
        scores, ids = top_k(self.score_all_for(query, history), self.k)
        return padded_ids(ids, scores), scores
