"""How to load and call each kind of variant: backend -> loader. Later stages register their backends.

Every loaded variant is a callable (history, lengths, timestamps) -> (item ids [B, K], scores [B, K]).
"""
from __future__ import annotations

from typing import Callable

import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.core import PipelineError, Variant

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Loader = Callable[[Variant, torch.device, int], Callable]
LOADERS: dict[str, Loader] = {}


def register(backend: str) -> Callable[[Loader], Loader]:
    def wrap(fn: Loader) -> Loader:
        LOADERS[backend] = fn
        return fn

    return wrap


def build_retriever(checkpoint: str, top_k: int, precision: str, device: torch.device) -> torch.nn.Module:
    """The eager retriever of a checkpoint in the given precision: the base every backend starts from."""
    from pipeline.models import Retriever

    model, payload = load_checkpoint(checkpoint)
    if precision not in DTYPES:
        raise PipelineError(f"no eager form for precision {precision}; valid: {', '.join(DTYPES)}")
    retriever = Retriever(model, k=top_k, l2_norm=bool(payload["model_config"].get("l2_norm", True)))
    return retriever.to(device=device, dtype=DTYPES[precision]).eval()


@register("eager")
def _load_eager(variant: Variant, device: torch.device, top_k: int) -> Callable:
    return build_retriever(variant.artifact, top_k, variant.precision, device)


def load_variant(variant: Variant, device: torch.device, top_k: int) -> Callable:
    if variant.backend not in LOADERS:
        raise PipelineError(f"no loader for backend '{variant.backend}'; known: {', '.join(LOADERS)}")
    return LOADERS[variant.backend](variant, device, top_k)
