"""GPU: the retriever in bf16 on CUDA with its L2-normalized item table stored in int8 with one fp32 scale
per row (symmetric, scale = max |row| / 127), scored by the fused retrieval kernel
(pipeline.kernels.retrieval_top_k with scales). CUDA only: the int8 stage skips it elsewhere.

This is the hook for the GPU part of the int8 issue; it has not run on a GPU yet.
"""
from __future__ import annotations

import torch

from pipeline.core import PipelineError, Variant

BACKEND = "int8_table"


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the int8 item table is scored by the fused Triton retrieval kernel, which needs CUDA (device is {device.type})"
    return None


def quantize_rows(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, D] float -> (int8 [N, D], fp32 scales [N]) with table ~= int8 * scales[:, None]."""
    table = table.float()
    scales = table.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(table / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class Int8TableRetriever:
    def __init__(self, checkpoint: str, top_k: int, device: torch.device) -> None:
        from pipeline.variants import build_retriever

        self.retriever, self.k = build_retriever(checkpoint, top_k, "bf16", device), top_k
        with torch.no_grad():
            self.table, self.scales = quantize_rows(self.retriever.table(torch.float32))

    @torch.no_grad()
    def __call__(self, history, lengths, timestamps=None):
        from pipeline import kernels

        query = self.retriever.query(history, lengths, timestamps)
        with kernels.use("triton", "retrieval"):
            scores, ids = kernels.retrieval_top_k(query, self.table, history, self.k, scales=self.scales)
        return torch.where(torch.isneginf(scores), torch.zeros_like(ids), ids), scores


def load_int8_table_variant(variant: Variant, device: torch.device, top_k: int) -> Int8TableRetriever:
    reason = unavailable_reason(device)
    if reason:
        raise PipelineError(f"{variant.name}: {reason}")
    return Int8TableRetriever(variant.artifact, top_k, device)
