"""HSTU's U-gating: layer_norm(attention output) * u, in one pass over the rows.

The reference is two PyTorch ops (what HSTULayer always computed); the Triton kernel (triton_ln_gate.py)
reads x and u once and writes the gated rows, without the normalized intermediate. Under torch.compile,
Inductor fuses the reference itself, so whether the custom kernel pays is for `make bench` to say.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def layer_norm_gate_reference(x: Tensor, u: Tensor, eps: float, silu_u: bool = False) -> Tensor:
    """x, u [..., D] -> layer_norm(x) * u (no affine parameters, as in HSTU); * silu(u) with silu_u."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (F.silu(u) if silu_u else u)


@torch.library.custom_op("genrec::layer_norm_gate", mutates_args=())
def _layer_norm_gate_triton(x: Tensor, u: Tensor, eps: float, silu_u: bool) -> Tensor:
    from pipeline.kernels.triton_ln_gate import gate

    return gate(x, u, eps, silu_u)


@_layer_norm_gate_triton.register_fake
def _(x, u, eps, silu_u):
    return torch.empty_like(x)


def layer_norm_gate(x: Tensor, u: Tensor, eps: float, silu_u: bool = False) -> Tensor:
    """The op behind the switch (pipeline.kernels, op "ln_gate"). The Triton kernel runs for inference only:
    it has no backward, so training (autograd recording) keeps the reference. silu_u: u is pre-activation
    (a slice of the raw projection, read in place) and SiLU is applied on the way in."""
    from pipeline.kernels import wants_triton

    if torch.is_grad_enabled() and (x.requires_grad or u.requires_grad):
        return layer_norm_gate_reference(x, u, eps, silu_u)
    if wants_triton("ln_gate", x.device):
        return torch.ops.genrec.layer_norm_gate(x, u, eps, silu_u)
    return layer_norm_gate_reference(x, u, eps, silu_u)
