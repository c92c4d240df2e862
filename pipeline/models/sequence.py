"""What HSTU and SASRec share about right-padded histories (items at 0..length-1, zeros after): the
validity and attention masks and the input embedding."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def valid_mask(history: Tensor, lengths: Tensor) -> Tensor:
    """[B, L] bool: True at positions 0..length-1."""
    positions = torch.arange(history.size(1), device=history.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)


def attention_mask(history: Tensor, lengths: Tensor) -> Tensor:
    """[B, L, L] bool: query i may attend key j when j <= i and j is a real item."""
    positions = torch.arange(history.size(1), device=history.device)
    causal = positions.unsqueeze(1) >= positions.unsqueeze(0)
    return causal.unsqueeze(0) & valid_mask(history, lengths).unsqueeze(1)


def check_length(history: Tensor, max_len: int) -> None:
    if history.size(1) > max_len:
        raise ValueError(
            f"history has {history.size(1)} positions but the model was built with max_len={max_len}; "
            "truncate histories to their most recent max_len items"
        )


def input_tables(num_items: int, max_len: int, dim: int) -> tuple[nn.Embedding, nn.Embedding]:
    """The item table (row 0 = padding, kept zero) and the learned position table, initialized as in
    the HSTU reference so that HSTU and SASRec start alike."""
    item_embedding = nn.Embedding(num_items + 1, dim, padding_idx=0)
    position_embedding = nn.Embedding(max_len, dim)
    nn.init.trunc_normal_(item_embedding.weight, std=0.02)
    nn.init.trunc_normal_(position_embedding.weight, std=math.sqrt(1.0 / dim))
    with torch.no_grad():
        item_embedding.weight[0].zero_()
    return item_embedding, position_embedding


def embed_history(
    history: Tensor,
    lengths: Tensor,
    item_embedding: nn.Embedding,
    position_embedding: nn.Embedding,
    dropout: float,
    training: bool,
) -> tuple[Tensor, Tensor]:
    """Scaled item embedding + learned absolute position, dropout, zero at padding -> ([B, L, D], valid [B, L, 1])."""
    check_length(history, position_embedding.num_embeddings)
    valid = valid_mask(history, lengths).unsqueeze(-1)
    x = item_embedding(history) * math.sqrt(item_embedding.embedding_dim)
    x = x + position_embedding.weight[: history.size(1)]
    return F.dropout(x, p=dropout, training=training) * valid.to(x.dtype), valid
