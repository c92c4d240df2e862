"""How to load and call each kind of variant: backend -> loader. Later stages register their backends.

Every variant's files are checked against the digest written when they were made before it is loaded.
Every loaded variant is a callable (history, lengths, timestamps) -> (item ids [B, K], scores [B, K]).
"""
from __future__ import annotations

from typing import Callable

import torch

from pipeline.catalogue import DTYPES, build
from pipeline.checkpoint import load_checkpoint
from pipeline.core import ConfigError, PipelineError, Variant
from pipeline.integrity import recorded, verify_digest

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
@register("inductor")
def _load_retriever_variant(variant: Variant, device: torch.device, top_k: int) -> Callable:
    """Eager and torch.compile variants: the checkpoint's retriever, built by its spec (pipeline.catalogue)."""
    retriever = build_retriever(variant.artifact, top_k, variant.precision, device)  # checks the file's digest
    weights = next(iter(recorded(variant.artifact).values()))  # that digest: which weights these are
    return build(variant.spec, retriever, device, source=(weights, variant.precision, str(device), top_k))


@register("onnxruntime")
def _load_onnxruntime(variant: Variant, device: torch.device, top_k: int) -> Callable:
    from pipeline.export.onnx import load_onnx_variant

    return load_onnx_variant(variant, device, top_k)


@register("aoti")
def _load_aoti(variant: Variant, device: torch.device, top_k: int) -> Callable:
    from pipeline.export.inductor import AotiRetriever

    if variant.options.get("top_k", top_k) != top_k:
        raise ConfigError(f"{variant.name} answers top-{variant.options['top_k']}, asked for top-{top_k}: "
                            "set compile.top_k and validate.top_k alike")
    return AotiRetriever(variant.artifact, device, bool(variant.options.get("uses_timestamps", False)))


@register("tensorrt")
def _load_tensorrt(variant: Variant, device: torch.device, top_k: int) -> Callable:
    from pipeline.export.trt import load_trt_variant

    return load_trt_variant(variant, device, top_k)


@register("torchao")
def _load_torchao(variant: Variant, device: torch.device, top_k: int) -> Callable:
    from pipeline.quant.torchao_pt2e import load_torchao_variant

    return load_torchao_variant(variant, device, top_k)


@register("int8_table")
def _load_int8_table(variant: Variant, device: torch.device, top_k: int) -> Callable:
    from pipeline.quant.int8_table import load_int8_table_variant

    return load_int8_table_variant(variant, device, top_k)


def load_variant(variant: Variant, device: torch.device, top_k: int) -> Callable:
    if variant.backend not in LOADERS:
        raise PipelineError(f"no loader for backend '{variant.backend}'; known: {', '.join(LOADERS)}")
    verify_digest(variant.artifact)
    return LOADERS[variant.backend](variant, device, top_k)
