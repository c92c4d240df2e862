"""HSTU's U-gating: layer_norm(attention output) * u, in one pass over the rows.

The reference is two PyTorch ops (what HSTULayer always computed); the Triton kernel (triton_ln_gate.py)
reads x and u once and writes the gated rows, without the normalized intermediate. Under torch.compile,
Inductor fuses the reference itself, so whether the custom kernel pays is for `make bench` to say.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def layer_norm_gate_reference(x: Tensor, u: Tensor, eps: float) -> Tensor:
    """x, u [..., D] -> layer_norm(x) * u (no affine parameters, as in HSTU)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * u


@torch.library.custom_op("genrec::layer_norm_gate", mutates_args=())
def _layer_norm_gate_triton(x: Tensor, u: Tensor, eps: float) -> Tensor:
    from pipeline.kernels.triton_ln_gate import layer_norm_gate

    return layer_norm_gate(x, u, eps)


@_layer_norm_gate_triton.register_fake
def _(x, u, eps):
    return torch.empty_like(x)


def layer_norm_gate(x: Tensor, u: Tensor, eps: float) -> Tensor:
    """The op behind the switch (pipeline.kernels, op "ln_gate"). The Triton kernel runs for inference only:
    it has no backward, so training (autograd recording) keeps the reference."""
    from pipeline.kernels import wants_triton

    if torch.is_grad_enabled() and (x.requires_grad or u.requires_grad):
        return layer_norm_gate_reference(x, u, eps)
    if wants_triton("ln_gate", x.device):
        return torch.ops.genrec.layer_norm_gate(x, u, eps)
    return layer_norm_gate_reference(x, u, eps)
