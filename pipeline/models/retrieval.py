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


class Retriever(nn.Module):
    """The call every variant answers: padded histories (+lengths) -> top-K item ids and scores,
    already-seen items filtered.

    When fewer than k items are left after filtering, the remaining slots hold id 0 (padding) with score
    -inf rather than a seen item.
    """

    def __init__(self, encoder: nn.Module, k: int, l2_norm: bool = True) -> None:
        super().__init__()
        num_items = encoder.item_embeddings().size(0) - 1
        if not 1 <= k <= num_items:
            raise ValueError(f"k={k} must be between 1 and the number of items ({num_items})")
        self.encoder, self.k, self.l2_norm = encoder, k, l2_norm

    def score_all(self, history: Tensor, lengths: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """-> [B, N+1] scores of every item, column 0 and history items at -inf (for full-ranking evaluation)."""
        query = last_position(self.encoder(history, lengths, timestamps), lengths)
        table = self.encoder.item_embeddings().to(query.dtype)
        if self.l2_norm:
            query, table = l2_normalize(query), l2_normalize(table)
        return mask_history(query @ table.T, history)

    def forward(self, history: Tensor, lengths: Tensor, timestamps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """history, lengths[, timestamps] -> (item ids [B, k] int64, scores [B, k])."""
        if kernels.backend("retrieval") == "triton":
            query = last_position(self.encoder(history, lengths, timestamps), lengths)
            table = self.encoder.item_embeddings()
            if self.l2_norm:
                query, table = l2_normalize(query), l2_normalize(table.to(query.dtype))
            scores, ids = kernels.retrieval_top_k(query, table, history, self.k)
        else:
            scores, ids = top_k(self.score_all(history, lengths, timestamps), self.k)
        return torch.where(torch.isneginf(scores), torch.zeros_like(ids), ids), scores
