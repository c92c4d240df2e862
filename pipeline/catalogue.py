"""The variant catalogue: every build the pipeline makes and the bench times is one VariantSpec, named by
one rule, so that a name means the same build in bench.md, in validate's table and in the MLflow registry.

Naming rule (VariantSpec.name; VariantSpec.parse is its inverse):

    <backend>[-<mode>][-graph][-triton][-int8table][-ref_<op>...]-<precision>

mode is the torch.compile mode, left out when "default"; "graph" means the whole call captured in one CUDA
graph by CompiledRetriever, which needs Inductor's own CUDA graphs off, so with it mode
max-autotune-no-cudagraphs is written "max-autotune". Examples: eager-fp32, inductor-max-autotune-bf16,
inductor-max-autotune-graph-triton-fp16, inductor-max-autotune-graph-triton-ref_ln_gate-bf16, aoti-fp16,
onnxruntime-int8.

Needs torch only (no hydra, no omegaconf): the bench imports it on bare GPU hosts.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import partial
from types import FunctionType
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import torch

from pipeline.core import PipelineError

if TYPE_CHECKING:
    from pipeline.core import Variant

BACKENDS = ("eager", "inductor", "aoti", "onnxruntime", "tensorrt", "torchao", "int8_table")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KERNELS = ("reference", "triton")
OPS = ("retrieval", "hstu_attention", "ln_gate")  # pipeline.kernels.OPS, without importing the kernels
MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")
# Inductor freezing (weights as constants) for inductor builds, in the compile stage and in the bench alike:
# the variant validated is the variant timed. Off: a frozen graph bypasses AOTAutograd's cache, so every
# process that loads a spec (validate, each serving engine) re-runs AOTAutograd and the freezing passes per
# shape: 7.3 s against 2.0 s a shape from a warm cache on the CPU, for the same p50 (0.37 ms at batch 1,
# 11.4 ms at 128, the default retriever). The normalized table is computed once either way (Retriever.freeze).
FREEZING = False
# Modes in which Inductor captures CUDA graphs itself: cuda_graph (our capture) cannot be added to them.
_SELF_CAPTURING = ("max-autotune", "reduce-overhead")
_GRAPH_MODE_ALIAS = {"max-autotune-no-cudagraphs": "max-autotune"}  # how a mode is written beside "graph"


@dataclass(frozen=True)
class VariantSpec:
    """One build of the retriever. Only inductor takes a mode; only eager and inductor take the kernel
    switches (the other backends export plain PyTorch)."""

    backend: str
    precision: str
    kernels: str = "reference"              # reference | triton (pipeline.kernels)
    mode: str | None = None                 # torch.compile mode (inductor only; None there means default)
    cuda_graph: bool = False                # the whole call captured by CompiledRetriever (CapturedCalls)
    int8_table: bool = False                # the item table in int8 with per-row scales (Retriever.freeze)
    reference_ops: tuple[str, ...] = ()     # ops kept on the PyTorch reference although kernels is triton

    def __post_init__(self) -> None:
        if self.backend == "inductor" and self.mode is None:
            object.__setattr__(self, "mode", "default")
        object.__setattr__(self, "reference_ops", tuple(self.reference_ops))
        problem = self._problem()
        if problem:
            raise PipelineError(f"variant {self._fields()}: {problem}")

    def _fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    def _problem(self) -> str | None:
        if self.backend not in BACKENDS:
            return f"unknown backend '{self.backend}'; valid choices: {', '.join(BACKENDS)}"
        if self.precision not in PRECISIONS:
            return f"unknown precision '{self.precision}'; valid choices: {', '.join(PRECISIONS)}"
        if self.precision == "int8" and self.backend in ("eager", "inductor", "aoti"):
            return f"{self.backend} has no int8 form (int8 variants come from the int8 stage)"
        if self.kernels not in KERNELS:
            return f"unknown kernels '{self.kernels}'; valid choices: {', '.join(KERNELS)}"
        if self.mode is not None and self.backend != "inductor":
            return "only inductor variants take a torch.compile mode"
        if self.mode is not None and self.mode not in MODES:
            return f"unknown torch.compile mode '{self.mode}'; valid choices: {', '.join(MODES)}"
        if self.cuda_graph and self.backend != "inductor":
            return "cuda_graph captures a compiled call: inductor variants only"
        if self.cuda_graph and self.mode in _SELF_CAPTURING:
            return (f"cuda_graph=true captures the call itself; mode '{self.mode}' already uses Inductor's CUDA "
                    "graphs: pick max-autotune-no-cudagraphs or default")
        if (self.kernels != "reference" or self.int8_table) and self.backend not in ("eager", "inductor", "int8_table"):
            return f"{self.backend} exports plain PyTorch: kernels and int8_table are for eager and inductor variants"
        unknown = [op for op in self.reference_ops if op not in OPS]
        if unknown:
            return f"unknown reference_ops {unknown}; valid choices: {', '.join(OPS)}"
        if self.reference_ops and self.kernels != "triton":
            return "reference_ops keep ops off our kernels: only with kernels=triton"
        return None

    @property
    def baseline(self) -> bool:
        """Plain PyTorch: eager or torch.compile with the reference kernels and nothing of ours."""
        return (self.backend in ("eager", "inductor") and self.kernels == "reference" and not self.cuda_graph
                and not self.int8_table)

    @property
    def name(self) -> str:
        mode = self.mode if self.mode != "default" else None
        if mode and self.cuda_graph:
            mode = _GRAPH_MODE_ALIAS.get(mode, mode)
        return "-".join([self.backend, *([mode] if mode else []), *(["graph"] if self.cuda_graph else []),
                         *(["triton"] if self.kernels == "triton" else []), *(["int8table"] if self.int8_table else []),
                         *(f"ref_{op}" for op in self.reference_ops), self.precision])

    def options(self) -> dict[str, Any]:
        """What a Variant records of its spec (Variant.options); from_options reads it back."""
        out: dict[str, Any] = {"kernels": self.kernels}
        if self.mode is not None:
            out["mode"] = self.mode
        if self.cuda_graph:
            out["cuda_graph"] = True
        if self.int8_table:
            out["int8_table"] = True
        if self.reference_ops:
            out["reference_ops"] = list(self.reference_ops)
        return out

    def variant(self, artifact: str, stage: str, **options: Any) -> Variant:
        """The manifest's record of this build: its name, backend and precision are the spec's."""
        from pipeline.core import Variant

        return Variant(self.name, self.backend, self.precision, str(artifact), stage, {**self.options(), **options})

    @classmethod
    def from_options(cls, backend: str, precision: str, options: Mapping[str, Any]) -> VariantSpec:
        return cls(backend, precision, kernels=options.get("kernels", "reference"), mode=options.get("mode"),
                   cuda_graph=bool(options.get("cuda_graph", False)), int8_table=bool(options.get("int8_table", False)),
                   reference_ops=tuple(options.get("reference_ops") or ()))

    @classmethod
    def parse(cls, name: str) -> VariantSpec:
        """The spec a name stands for (the naming rule's inverse); a name not written by the rule is refused."""
        tokens = name.split("-")
        if len(tokens) < 2:
            raise PipelineError(f"variant name '{name}' is not <backend>[-...]-<precision> (e.g. inductor-max-autotune-fp16)")
        backend, precision, middle = tokens[0], tokens[-1], "-".join(tokens[1:-1])
        mode = None
        for candidate in sorted(MODES, key=len, reverse=True):
            if middle == candidate or middle.startswith(candidate + "-"):
                mode, middle = candidate, middle[len(candidate) + 1:]
                break
        rest = middle.split("-") if middle else []
        flags = {"graph": False, "triton": False, "int8table": False}
        ops = []
        for token in rest:
            if token in flags:
                flags[token] = True
            elif token.startswith("ref_"):
                ops.append(token[4:])
            else:
                raise PipelineError(f"variant name '{name}': unknown part '{token}' (the rule: {_RULE})")
        if flags["graph"] and mode == "max-autotune":
            mode = "max-autotune-no-cudagraphs"
        if backend == "inductor" and mode is None:
            mode = "default"
        try:
            spec = cls(backend, precision, kernels="triton" if flags["triton"] else "reference", mode=mode,
                       cuda_graph=flags["graph"], int8_table=flags["int8table"], reference_ops=tuple(ops))
        except PipelineError as err:
            raise PipelineError(f"variant name '{name}': {str(err).split(': ', 1)[1]}") from None
        if spec.name != name:
            raise PipelineError(f"variant name '{name}' is not written by the rule ({_RULE}); this build is '{spec.name}'")
        return spec

    @classmethod
    def from_entry(cls, entry: str | Mapping[str, Any], backend: str | None = None,
                   precision: str | None = None) -> VariantSpec:
        """A config entry: a name, or a mapping of spec fields (backend and precision default to the given)."""
        if isinstance(entry, str):
            spec = cls.parse(entry)
            if backend is not None and spec.backend != backend:
                raise PipelineError(f"variant '{entry}' is a {spec.backend} variant; this list takes {backend} only")
            return spec
        if not isinstance(entry, Mapping):
            raise PipelineError(f"variant entry {entry!r}: a name or a mapping of {', '.join(f.name for f in fields(cls))}")
        values = dict(entry)
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise PipelineError(f"variant entry {values}: unknown key(s) {', '.join(unknown)}; "
                                f"valid: {', '.join(f.name for f in fields(cls))}")
        values.setdefault("backend", backend)
        values.setdefault("precision", precision)
        if values["backend"] is None or values["precision"] is None:
            raise PipelineError(f"variant entry {dict(entry)}: needs a backend and a precision")
        if backend is not None and values["backend"] != backend:
            raise PipelineError(f"variant entry {dict(entry)}: this list takes {backend} variants only")
        values["reference_ops"] = tuple(values.get("reference_ops") or ())
        return cls(**values)


_RULE = "<backend>[-<mode>][-graph][-triton][-int8table][-ref_<op>...]-<precision>"


def build(spec: VariantSpec, retriever: torch.nn.Module, device: torch.device, source: tuple | None = None) -> Callable:
    """The spec's call over an eager retriever already in its precision and on its device:
    predict(history, lengths, timestamps=None) -> (ids, scores). The one way eager and inductor variants
    are made, by the compile stage, validate's loader and the bench alike. source: what the retriever was
    loaded from (the checkpoint's digest, precision, device, top-k): an inductor spec with the reference kernels is
    then built once per process for those weights, and our kernels' variant of the same spec uses that
    build as its reference twin (pipeline.export.inductor.shared_reference_build)."""
    if spec.backend not in ("eager", "inductor"):
        raise PipelineError(f"{spec.name}: a {spec.backend} variant loads from the artifact its stage wrote")
    if spec.kernels == "triton":
        from pipeline import kernels

        if not kernels.triton_runs_on(device):
            raise PipelineError(f"{spec.name}: Triton kernels need a CUDA device (device is {device.type})")
    if not spec.baseline or spec.backend == "inductor":
        # The normalized (or int8) table computed once. A plain eager baseline normalizes it on every call,
        # as plain PyTorch does; Inductor's freezing would fold it to a constant anyway.
        retriever.freeze(int8_table=spec.int8_table)
    if spec.backend == "inductor":
        from pipeline.export.inductor import CompiledRetriever, shared_reference_build

        if source is not None:
            source = (*source, spec.int8_table)
            if spec.kernels == "reference" and not spec.reference_ops:
                return shared_reference_build(source, retriever, spec.mode, spec.cuda_graph, FREEZING)
        return CompiledRetriever(retriever, spec.mode, spec.kernels, spec.reference_ops, cuda_graph=spec.cuda_graph,
                                 freezing=FREEZING, source=source)
    from pipeline.export.inductor import kernel_choice

    @torch.no_grad()
    def predict(history, lengths, timestamps=None):
        with kernel_choice(spec.kernels, spec.reference_ops):
            return retriever(history, lengths, timestamps)

    # What CompiledRetriever carries too: eager_form reads them.
    predict.retriever, predict.kernels, predict.reference_ops = retriever, spec.kernels, spec.reference_ops
    return predict


def eager_form(predict: Callable) -> tuple[torch.nn.Module, Callable[[], ContextManager]] | None:
    """For a variant build() made (eager or inductor): its eager retriever (on the variant's device, in its
    precision, frozen as the variant is) and a context manager factory holding the variant's kernel choice,
    for callers that run the model's modules another way (incremental serving, pipeline.serving.kvcache).
    None for a variant loaded from an exported artifact (ONNX, AOTInductor, TensorRT, torchao, int8_table):
    it has no modules to reach."""
    from pipeline.export.inductor import CompiledRetriever, kernel_choice

    if not (isinstance(predict, CompiledRetriever) or isinstance(predict, FunctionType)):
        return None
    retriever = getattr(predict, "retriever", None)
    if not isinstance(retriever, torch.nn.Module):
        return None
    return retriever, partial(kernel_choice, predict.kernels, tuple(predict.reference_ops))
