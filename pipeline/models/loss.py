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
    dense: bool | None = None,
) -> Tensor:
    """Mean over positions with a label of -log softmax([<q, e_pos>, <q, e_neg_1..n>] / temperature)[0].

    seq_emb [B, L, D], labels [B, L] int64 (0 = no label), item_table [N+1, D]. Negatives are drawn
    uniformly from items 1..N. With per_position (the reference's sampler) every position draws its own
    set, which gathers B*L*n embeddings; otherwise one set is shared by the whole batch, one
    [B*L, D] x [D, n] matmul, much cheaper on a CPU. A negative equal to a position's positive is left
    out of that position's softmax. dense (default: chosen by cost) computes every item's logit and
    gathers the sampled ones: the same loss, cheaper per position on a small catalog.
    """
    num_items, dim = item_table.size(0) - 1, item_table.size(1)
    shape = (*labels.shape, num_negatives) if per_position else (num_negatives,)
    negatives = torch.randint(1, num_items + 1, shape, generator=generator, device=labels.device)
    norm = l2_normalize if l2_norm else (lambda x: x)
    query = norm(seq_emb)
    if dense is None:
        # Per position, all N+1 logits cost B*L*(N+1) against B*L*n*D for the n gathered rows: on a small
        # catalog (ML-1M: 3,707 < 128 * 64) scoring everything and picking n columns is far cheaper.
        dense = per_position and num_items + 1 <= num_negatives * dim
    if dense:
        table = norm(item_table)  # the row norm commutes with gathering: same logits, same gradients
        positive_logits = (query * table[labels]).sum(-1, keepdim=True)
        all_logits = query @ table.T
        negative_logits = all_logits.gather(-1, negatives if per_position else negatives.expand(*labels.shape, -1))
    else:
        positive_logits = (query * norm(item_table[labels])).sum(-1, keepdim=True)
        sampled = norm(item_table[negatives])
        if per_position:
            negative_logits = torch.einsum("bld,blnd->bln", query, sampled)
        else:
            negative_logits = query @ sampled.T
    negative_logits = negative_logits.masked_fill(labels.unsqueeze(-1) == negatives, float("-inf"))
    logits = torch.cat([positive_logits, negative_logits], dim=-1).float() / temperature
    losses = -F.log_softmax(logits, dim=-1)[..., 0]
    weights = (labels != 0).to(losses.dtype)
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)
