"""GPU: the retriever in bf16 on CUDA with its L2-normalized item table stored in int8 with one fp32 scale
per row (Retriever.freeze(int8_table=True): symmetric, scale = max |row| / 127), scored by the fused
retrieval kernel (pipeline.kernels, int8 tables with scales). CUDA only: the int8 stage skips it elsewhere.

Measured on the H100 by `make bench` (variants *-int8table, docs/BENCHMARKS.md); the stage path (build,
parity, validate) has not run on a GPU.
"""
from __future__ import annotations

import torch

from pipeline.catalogue import VariantSpec
from pipeline.core import PipelineError, Variant

BACKEND = "int8_table"
SPEC = VariantSpec(BACKEND, "int8", kernels="triton")


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the int8 item table is scored by the fused Triton retrieval kernel, which needs CUDA (device is {device.type})"
    return None


class Int8TableRetriever:
    def __init__(self, checkpoint: str, top_k: int, device: torch.device) -> None:
        from pipeline.variants import build_retriever

        self.retriever = build_retriever(checkpoint, top_k, "bf16", device).freeze(int8_table=True)

    @torch.no_grad()
    def __call__(self, history, lengths, timestamps=None):
        from pipeline import kernels

        with kernels.use("triton", "retrieval"):
            return self.retriever(history, lengths, timestamps)


def load_int8_table_variant(variant: Variant, device: torch.device, top_k: int) -> Int8TableRetriever:
    reason = unavailable_reason(device)
    if reason:
        raise PipelineError(f"{variant.name}: {reason}")
    return Int8TableRetriever(variant.artifact, top_k, device)
