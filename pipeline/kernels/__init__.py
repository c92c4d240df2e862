"""Our Triton kernels, each beside its PyTorch reference, and the switch that picks one per op.

    from pipeline import kernels
    kernels.set_backend("triton")              # or per op: kernels.set_backend("triton", op="retrieval")
    with kernels.use("reference"): ...         # scoped

The choice is read when a model is traced or run, so torch.compile bakes in whichever is set at compile
time. With "triton", each op still runs its reference at shapes where the reference was timed faster
(dispatch.py; kernels.dispatch_log() lists the choice per op and shape). The Triton side is registered as torch.library custom ops (namespace "genrec") with fake
implementations, so torch.compile and torch.export trace through them. The Triton modules are imported
only when a Triton kernel runs: TRITON_INTERPRET=1 must be set before that (tests on the CPU).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

BACKENDS = ("reference", "triton")
OPS = ("retrieval", "hstu_attention", "ln_gate")
_selected: dict[str, str] = {op: "reference" for op in OPS}


def _check(backend: str, op: str | None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend '{backend}'; valid choices: {', '.join(BACKENDS)}")
    if op is not None and op not in OPS:
        raise ValueError(f"unknown kernel op '{op}'; valid choices: {', '.join(OPS)}")


def set_backend(backend: str, op: str | None = None) -> None:
    """Pick triton or reference for one op, or for all ops when op is None."""
    _check(backend, op)
    for name in OPS if op is None else (op,):
        _selected[name] = backend


def backend(op: str) -> str:
    return _selected[op]


@contextmanager
def use(backend: str, op: str | None = None) -> Iterator[None]:
    before = dict(_selected)
    set_backend(backend, op)
    try:
        yield
    finally:
        _selected.update(before)


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA, or anywhere under the interpreter (TRITON_INTERPRET=1)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def wants_triton(op: str, device: torch.device) -> bool:
    if _selected[op] != "triton":
        return False
    if not triton_runs_on(device):
        raise RuntimeError(
            f"kernels.{op}=triton needs a CUDA device (or TRITON_INTERPRET=1 for tests); got {device}. "
            "Use compile.kernels=reference on the CPU"
        )
    return True


from pipeline.kernels.hstu_attention import hstu_attention, hstu_attention_reference  # noqa: E402
from pipeline.kernels.hstu_cached_attention import (  # noqa: E402
    cached_attention_reference,
    hstu_cached_attention,
)
from pipeline.kernels.ln_gate import layer_norm_gate, layer_norm_gate_reference  # noqa: E402
from pipeline.kernels.dispatch import dispatch_log  # noqa: E402
from pipeline.kernels.retrieval import (  # noqa: E402
    fix_unsure,
    needs_check,
    retrieval_top_k,
    retrieval_top_k_candidates,
    retrieval_top_k_reference,
)

__all__ = [
    "BACKENDS",
    "OPS",
    "backend",
    "cached_attention_reference",
    "dispatch_log",
    "fix_unsure",
    "hstu_attention",
    "hstu_attention_reference",
    "hstu_cached_attention",
    "layer_norm_gate",
    "layer_norm_gate_reference",
    "needs_check",
    "retrieval_top_k",
    "retrieval_top_k_candidates",
    "retrieval_top_k_reference",
    "set_backend",
    "use",
]
