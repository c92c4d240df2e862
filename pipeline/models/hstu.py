"""HSTU, the Hierarchical Sequential Transduction Unit of Zhai et al. 2024, "Actions Speak Louder than
Words" (https://arxiv.org/abs/2402.17152), on dense right-padded histories.

Follows the research model of meta-recsys/generative-recommenders: pointwise SiLU attention scaled by
1/max_len instead of a softmax, a learned relative-position bias (plus a bucketed time-difference bias)
per layer, and U-gating of the layer-normed attention output. Written for torch.compile and torch.export:
static shapes, masks instead of jagged tensors, no control flow on tensor values.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.kernels import hstu_attention, layer_norm_gate
from pipeline.models.sequence import attention_mask, embed_history, input_tables


class RelativeBias(nn.Module):
    """Learned bias per relative offset j - i, plus optionally one per log-bucketed time gap."""

    def __init__(self, max_len: int, time_bias: bool, num_time_buckets: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.num_time_buckets = num_time_buckets
        self.position_weight = nn.Parameter(torch.empty(2 * max_len - 1).normal_(std=0.02))
        self.time_weight = (
            nn.Parameter(torch.empty(num_time_buckets + 1).normal_(std=0.02)) if time_bias else None
        )

    def forward(self, seq_len: int, timestamps: Tensor | None, device: torch.device) -> Tensor:
        """[1, L, L] or, with time bias, [B, L, L]."""
        positions = torch.arange(seq_len, device=device)
        offsets = positions.unsqueeze(0) - positions.unsqueeze(1) + self.max_len - 1
        bias = self.position_weight[offsets].unsqueeze(0)
        if self.time_weight is None:
            return bias
        # The gap is measured from the query's own action, not the next one as in the reference:
        # at serving time the next action's time is not part of the input.
        gaps = (timestamps.unsqueeze(2) - timestamps.unsqueeze(1)).abs().clamp(min=1)
        # float32 on purpose: second-resolution gaps overflow fp16.
        buckets = (gaps.to(torch.float32).log() / 0.301).long().clamp(0, self.num_time_buckets)
        return bias + self.time_weight[buckets]


class HSTULayer(nn.Module):
    def __init__(
        self,
        dim: int,
        max_len: int,
        num_heads: int,
        attn_dim: int,
        hidden_dim: int,
        linear_dropout: float,
        time_bias: bool,
        num_time_buckets: int,
        eps: float,
    ) -> None:
        super().__init__()
        self.num_heads, self.attn_dim, self.hidden_dim = num_heads, attn_dim, hidden_dim
        self.max_len, self.linear_dropout, self.eps = max_len, linear_dropout, eps
        self.uvqk = nn.Linear(dim, 2 * num_heads * (hidden_dim + attn_dim), bias=False)
        self.out = nn.Linear(num_heads * hidden_dim, dim)
        self.relative_bias = RelativeBias(max_len, time_bias, num_time_buckets)
        nn.init.normal_(self.uvqk.weight, std=0.02)
        nn.init.xavier_uniform_(self.out.weight)

    def forward(self, x: Tensor, mask: Tensor, timestamps: Tensor | None, lengths: Tensor | None = None) -> Tensor:
        B, L, D = x.shape
        H, dv, dqk = self.num_heads, self.hidden_dim, self.attn_dim
        normed = F.layer_norm(x, (D,), eps=self.eps)
        # The raw projection, split into views: the kernels apply SiLU as they read u, v, q and k, so no
        # activated copy of them goes through memory (pipeline.kernels picks the reference or Triton).
        u, v, q, k = self.uvqk(normed).split([H * dv, H * dv, H * dqk, H * dqk], dim=-1)
        out = hstu_attention(
            q.view(B, L, H, dqk), k.view(B, L, H, dqk), v.view(B, L, H, dv),
            mask=mask, lengths=lengths, max_len=self.max_len,
            bias=lambda: self.relative_bias(L, timestamps, x.device),
            position_weight=self.relative_bias.position_weight if self.relative_bias.time_weight is None else None,
            silu_inputs=True,
        ).reshape(B, L, H * dv)
        gated = layer_norm_gate(out, u, self.eps, silu_u=True)
        return x + self.out(F.dropout(gated, p=self.linear_dropout, training=self.training))

    def forward_last(self, x: Tensor, timestamps: Tensor | None, lengths: Tensor) -> Tensor:
        """forward(...) at position length-1 only: [B, L, D] -> [B, D]. Keys and values still come from
        every position, but the query, the attention row, the gating and the output projection are computed
        for one position instead of L."""
        B, L, D = x.shape
        H, dv, dqk = self.num_heads, self.hidden_dim, self.attn_dim
        normed = F.layer_norm(x, (D,), eps=self.eps)
        weight = self.uvqk.weight  # rows: u, v, q, k; slices of it are views, not copies
        v = F.silu(F.linear(normed, weight[H * dv: 2 * H * dv])).view(B, L, H, dv)
        k = F.silu(F.linear(normed, weight[2 * H * dv + H * dqk:])).view(B, L, H, dqk)
        last = lengths - 1
        x_last = x.gather(1, last.view(B, 1, 1).expand(B, 1, D)).squeeze(1)
        uq = F.silu(F.linear(normed.gather(1, last.view(B, 1, 1).expand(B, 1, D)).squeeze(1), weight[: 2 * H * dv + H * dqk]))
        u = uq[:, : H * dv]
        q = uq[:, 2 * H * dv:].view(B, H, dqk)
        scores = torch.einsum("bhd,bjhd->bhj", q, k)
        positions = torch.arange(L, device=x.device)
        if self.relative_bias.time_weight is None:
            bias = self.relative_bias.position_weight[positions.unsqueeze(0) - last.unsqueeze(1) + self.max_len - 1]
        else:
            rows = self.relative_bias(L, timestamps, x.device).expand(B, L, L)
            bias = rows.gather(1, last.view(B, 1, 1).expand(B, 1, L)).squeeze(1)
        mask = positions.unsqueeze(0) <= last.unsqueeze(1)  # causal and padding at once for the last query
        attn = F.silu(scores + bias.unsqueeze(1).to(scores.dtype)) / self.max_len * mask.unsqueeze(1).to(scores.dtype)
        out = torch.einsum("bhj,bjhd->bhd", attn, v).reshape(B, H * dv)
        gated = layer_norm_gate(out, u, self.eps)
        return x_last + self.out(F.dropout(gated, p=self.linear_dropout, training=self.training))


class HSTU(nn.Module):
    def __init__(
        self,
        num_items: int,
        max_len: int,
        dim: int = 50,
        num_layers: int = 2,
        num_heads: int = 1,
        attn_dim: int | None = None,
        hidden_dim: int | None = None,
        dropout: float = 0.2,
        linear_dropout: float = 0.2,
        time_bias: bool = False,
        num_time_buckets: int = 128,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if (attn_dim is None or hidden_dim is None) and dim % num_heads:
            raise ValueError(
                f"dim={dim} is not divisible by num_heads={num_heads}; set attn_dim and hidden_dim explicitly"
            )
        self.dropout, self.time_bias = dropout, time_bias
        self.item_embedding, self.position_embedding = input_tables(num_items, max_len, dim)
        self.layers = nn.ModuleList(
            HSTULayer(
                dim=dim,
                max_len=max_len,
                num_heads=num_heads,
                attn_dim=dim // num_heads if attn_dim is None else attn_dim,
                hidden_dim=dim // num_heads if hidden_dim is None else hidden_dim,
                linear_dropout=linear_dropout,
                time_bias=time_bias,
                num_time_buckets=num_time_buckets,
                eps=eps,
            )
            for _ in range(num_layers)
        )

    def item_embeddings(self) -> Tensor:
        return self.item_embedding.weight

    def forward(self, history: Tensor, lengths: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """history, lengths, timestamps (int64 [B, L], [B], [B, L]) -> sequence embeddings [B, L, dim]."""
        if self.time_bias and timestamps is None:
            raise ValueError("this HSTU was built with time_bias=True and needs timestamps [B, L]")
        x, valid = embed_history(
            history, lengths, self.item_embedding, self.position_embedding, self.dropout, self.training
        )
        mask = attention_mask(history, lengths)
        for layer in self.layers:
            x = layer(x, mask, timestamps if self.time_bias else None, lengths)
        # The reference's output step is an L2 norm, which the retrieval head and the loss apply.
        return x * valid.to(x.dtype)

    def encode_last(self, history: Tensor, lengths: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """forward(...) at position length-1 only, [B, dim]: what retrieval needs. The last layer runs for
        that one position (HSTULayer.forward_last); the others as in forward."""
        if self.time_bias and timestamps is None:
            raise ValueError("this HSTU was built with time_bias=True and needs timestamps [B, L]")
        x, _ = embed_history(
            history, lengths, self.item_embedding, self.position_embedding, self.dropout, self.training
        )
        mask = attention_mask(history, lengths)
        ts = timestamps if self.time_bias else None
        for layer in self.layers[:-1]:
            x = layer(x, mask, ts, lengths)
        return self.layers[-1].forward_last(x, ts, lengths)
