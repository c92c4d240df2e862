"""Sampled-softmax training loss of the HSTU reference (next-item prediction at every position)."""

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.models.retrieval import l2_normalize


def sampled_softmax_loss(
    seq_emb: Tensor,
    labels: Tensor,
    item_table: Tensor,
    num_negatives: int,
    temperature: float,
    l2_norm: bool,
    generator: torch.Generator | None = None,
    per_position: bool = False,
) -> Tensor:
    """Mean over positions with a label of -log softmax([<q, e_pos>, <q, e_neg_1..n>] / temperature)[0].

    seq_emb [B, L, D], labels [B, L] int64 (0 = no label), item_table [N+1, D]. Negatives are drawn
    uniformly from items 1..N. With per_position (the reference's sampler) every position draws its own
    set, which gathers B*L*n embeddings; otherwise one set is shared by the whole batch, one
    [B*L, D] x [D, n] matmul, much cheaper on a CPU. A negative equal to a position's positive is left
    out of that position's softmax.
    """
    num_items = item_table.size(0) - 1
    shape = (*labels.shape, num_negatives) if per_position else (num_negatives,)
    negatives = torch.randint(1, num_items + 1, shape, generator=generator, device=labels.device)
    query, positives, sampled = seq_emb, item_table[labels], item_table[negatives]
    if l2_norm:
        query, positives, sampled = l2_normalize(query), l2_normalize(positives), l2_normalize(sampled)
    positive_logits = (query * positives).sum(-1, keepdim=True)
    if per_position:
        negative_logits = torch.einsum("bld,blnd->bln", query, sampled)
    else:
        negative_logits = query @ sampled.T
    negative_logits = negative_logits.masked_fill(labels.unsqueeze(-1) == negatives, float("-inf"))
    logits = torch.cat([positive_logits, negative_logits], dim=-1).float() / temperature
    losses = -F.log_softmax(logits, dim=-1)[..., 0]
    weights = (labels != 0).to(losses.dtype)
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)
