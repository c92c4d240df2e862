"""Exported forms of the retriever (onnx, trt, inductor modules). Here: the retriever as one torch.export
program with a dynamic batch and history length, what the ONNX and TensorRT exports start from.

Custom kernel ops export through their PyTorch reference: the retriever comes from
pipeline.variants.build_retriever (plain PyTorch modules) and is traced under
`pipeline.kernels.use("reference")`, whatever kernel backend the process has selected (the compile stage
may have picked Triton). Should a torch.library op still reach the exported graph, the reference
registered for it beside its torch.library registration replaces it:

    from pipeline.export import register_reference
    register_reference(torch.ops.genrec.some_op.default, some_op_reference)

An op outside aten and prims with no reference stops the export with an error naming the op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from pipeline import kernels
from pipeline.core import PipelineError

OUTPUT_NAMES = ("item_ids", "scores")
# Namespaces every exporter understands; anything else is a custom op that needs its reference.
_CORE_NAMESPACES = ("aten", "prims")
_REFERENCES: dict[torch._ops.OpOverload, Callable] = {}


def register_reference(op: torch._ops.OpOverload, reference: Callable) -> None:
    """Export replaces `op` (a torch.library custom op) by `reference`, its plain PyTorch implementation."""
    _REFERENCES[op] = reference


@dataclass(frozen=True)
class ShapeRange:
    """A dynamic dimension: every size in [min, max] is accepted (max None: unbounded); TensorRT tunes
    its kernels for opt."""

    min: int
    opt: int
    max: int | None

    def check(self, what: str) -> "ShapeRange":
        if not 1 <= self.min <= self.opt <= (self.opt if self.max is None else self.max):
            raise PipelineError(f"{what} range must satisfy 1 <= min <= opt <= max, got {self}")
        return self


def input_names(retriever: nn.Module) -> list[str]:
    """The retriever's inputs: timestamps only for an encoder that reads them (HSTU with time_bias)."""
    names = ["history", "lengths"]
    if getattr(retriever.encoder, "time_bias", False):
        names.append("timestamps")
    return names


def max_history(retriever: nn.Module) -> int:
    return retriever.encoder.position_embedding.num_embeddings


def example_inputs(retriever: nn.Module, batch: int, length: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-padded histories of real item ids, lengths 1..length, increasing timestamps."""
    num_items = retriever.encoder.item_embeddings().size(0) - 1
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = length
    valid = torch.arange(length) < lengths[:, None]
    history = torch.randint(1, num_items + 1, (batch, length), generator=gen) * valid
    inputs = {"history": history, "lengths": lengths, "timestamps": torch.cumsum(valid.long() * 60, dim=1) * valid}
    return tuple(inputs[name].to(device) for name in input_names(retriever))


def dynamic_shapes(names: list[str], batch: ShapeRange, history: ShapeRange) -> dict[str, dict]:
    batch_dim = torch.export.Dim("batch", min=batch.min, max=batch.max)
    history_dim = torch.export.Dim("history_len", min=history.min, max=history.max)
    per_input = {"history": {0: batch_dim, 1: history_dim}, "lengths": {0: batch_dim},
                 "timestamps": {0: batch_dim, 1: history_dim}}
    return {name: per_input[name] for name in names}


def export_program(
    retriever: nn.Module, batch: ShapeRange, history: ShapeRange, device: torch.device
) -> torch.export.ExportedProgram:
    """torch.export of the retriever (dynamic batch and history length), custom ops replaced by references."""
    if history.max is None or history.max > max_history(retriever):
        raise PipelineError(
            f"history max {history.max} exceeds the model's max_len {max_history(retriever)}; "
            "histories are capped to model.max_len, so lower the history range"
        )
    names = input_names(retriever)
    # torch.export specializes sizes 0 and 1, so the example stays above both.
    example = example_inputs(retriever, max(batch.opt, 2), max(history.opt, 2), device)
    try:
        with kernels.use("reference"):
            program = torch.export.export(
                retriever, example, dynamic_shapes=dynamic_shapes(names, batch, history), strict=False
            )
    except Exception as err:
        raise PipelineError(f"torch.export could not trace the retriever: {type(err).__name__}: {err}") from err
    custom = _custom_ops(program)
    if custom & set(_REFERENCES):
        program = program.run_decompositions({op: _REFERENCES[op] for op in custom & set(_REFERENCES)})
    missing = sorted(str(op) for op in _custom_ops(program))
    if missing:
        raise PipelineError(
            f"the exported retriever calls custom op(s) {', '.join(missing)} that no exporter can translate; "
            "register their PyTorch reference with pipeline.export.register_reference(op, reference)"
        )
    return program


def _custom_ops(program: torch.export.ExportedProgram) -> set[torch._ops.OpOverload]:
    return {
        node.target
        for node in program.graph.nodes
        if node.op == "call_function"
        and isinstance(node.target, torch._ops.OpOverload)
        and node.target.namespace not in _CORE_NAMESPACES
    }
