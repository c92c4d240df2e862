"""SASRec (Kang & McAuley 2018, https://arxiv.org/abs/1808.09781): the softmax self-attention baseline.

A causal pre-LN transformer over right-padded histories with learned absolute positions and a point-wise
feed-forward network. Same call and output as HSTU, so the retrieval head and the loss serve both.
"""

import math

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.sequence import attention_mask, embed_history, input_tables


class SASRecLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn_in = nn.Linear(dim, dim)
        self.ffn_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        B, L, D = x.shape
        H = self.num_heads
        q, k, v = self.qkv(self.attn_norm(x)).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
        # Written out rather than F.scaled_dot_product_attention: with a mask, its CUDA kernels pad L to a
        # multiple of 8, which torch.export turns into a guard that a free sequence length cannot meet.
        # Every query row keeps key 0 (lengths >= 1), so no softmax row is empty.
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D // H)
        weights = scores.masked_fill(~mask.unsqueeze(1), float("-inf")).softmax(dim=-1)
        attn = F.dropout(weights, self.dropout, self.training) @ v
        x = x + F.dropout(self.attn_out(attn.transpose(1, 2).reshape(B, L, D)), self.dropout, self.training)
        hidden = F.dropout(F.relu(self.ffn_in(self.ffn_norm(x))), self.dropout, self.training)
        return x + F.dropout(self.ffn_out(hidden), self.dropout, self.training)


class SASRec(nn.Module):
    def __init__(
        self,
        num_items: int,
        max_len: int,
        dim: int = 50,
        num_layers: int = 2,
        num_heads: int = 1,
        dropout: float = 0.2,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.dropout = dropout
        self.item_embedding, self.position_embedding = input_tables(num_items, max_len, dim)
        self.layers = nn.ModuleList(SASRecLayer(dim, num_heads, dropout, eps) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(dim, eps=eps)

    def item_embeddings(self) -> Tensor:
        return self.item_embedding.weight

    def forward(self, history: Tensor, lengths: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """history, lengths (int64 [B, L], [B]) -> sequence embeddings [B, L, dim]; timestamps unused."""
        x, valid = embed_history(
            history, lengths, self.item_embedding, self.position_embedding, self.dropout, self.training
        )
        mask = attention_mask(history, lengths)
        for layer in self.layers:
            x = layer(x, mask)
        return self.final_norm(x) * valid.to(x.dtype)
