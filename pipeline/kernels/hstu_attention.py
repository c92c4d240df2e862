"""HSTU pointwise attention: silu(Q K^T + relative bias) / max_len under causal and padding masks, times V.

The reference materializes the [B, H, L, L] matrix (it is what HSTULayer always computed). The Triton
kernel (triton_hstu.py) walks key blocks flash-style and never writes it; it computes the positional bias
from the layer's position weights itself, so the time-gap bias keeps the reference.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def hstu_attention_reference(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor, max_len: int,
                             silu_inputs: bool = False) -> Tensor:
    """q, k [B, L, H, dqk], v [B, L, H, dv], bias [1|B, L, L], mask [B, L, L] bool -> [B, L, H, dv].
    silu_inputs: q, k and v are pre-activation; SiLU is applied to them first."""
    if silu_inputs:
        q, k, v = F.silu(q), F.silu(k), F.silu(v)
    scores = torch.einsum("bihd,bjhd->bhij", q, k)
    scores = scores + bias.unsqueeze(1).to(scores.dtype)
    # Dividing by max_len rather than L keeps outputs independent of how far a batch is padded.
    attn = F.silu(scores) / max_len * mask.unsqueeze(1).to(scores.dtype)
    return torch.einsum("bhij,bjhd->bihd", attn, v)


def hstu_attention_positional(q: Tensor, k: Tensor, v: Tensor, position_weight: Tensor, lengths: Tensor,
                              max_len: int, silu_inputs: bool = False) -> Tensor:
    """The reference with the bias and masks the Triton kernel derives itself: position_weight indexed by
    j - i + max_len - 1, keys j <= i and j < length. -> [B, L, H, dv], contiguous as the kernel's output."""
    positions = torch.arange(q.shape[1], device=q.device)
    bias = position_weight[positions[None, :] - positions[:, None] + max_len - 1].unsqueeze(0)
    mask = (positions[None, :] <= positions[:, None]).unsqueeze(0) & (positions[None, None, :] < lengths[:, None, None])
    return hstu_attention_reference(q, k, v, bias, mask, max_len, silu_inputs).contiguous()


@torch.library.custom_op("genrec::hstu_attention", mutates_args=())
def _hstu_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, position_weight: Tensor, lengths: Tensor, max_len: int, silu_inputs: bool
) -> Tensor:
    from pipeline.kernels.triton_hstu import attention

    return attention(q, k, v, position_weight, lengths, max_len, silu_inputs)


@_hstu_attention_triton.register_fake
def _(q, k, v, position_weight, lengths, max_len, silu_inputs):
    return v.new_empty(v.shape)


def hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor,
    lengths: Tensor | None,
    max_len: int,
    bias: Callable[[], Tensor],
    position_weight: Tensor | None,
    silu_inputs: bool = False,
) -> Tensor:
    """The op behind the switch. The Triton kernel runs when selected and the bias is purely positional
    (position_weight given, indexed by j - i + max_len - 1) and lengths are known; else the reference
    with bias() and mask. silu_inputs: q, k, v are the raw projection (slices of it, read in place) and
    SiLU is applied on the way in, so no activated copy of them is written."""
    from pipeline.kernels import wants_triton

    if position_weight is not None and lengths is not None and wants_triton("hstu_attention", q.device):
        return torch.ops.genrec.hstu_attention(q, k, v, position_weight, lengths, max_len, silu_inputs)
    return hstu_attention_reference(q, k, v, bias(), mask, max_len, silu_inputs)
