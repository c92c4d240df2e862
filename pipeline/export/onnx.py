"""ONNX: the retriever through the dynamo exporter (dynamic batch and history length; history filtering
and top-K inside the graph), checked with onnx.checker, and an ONNX Runtime session that answers like
every other variant: (history, lengths[, timestamps]) -> (item ids [B, K] int64, scores [B, K])."""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.core import PipelineError, Variant
from pipeline.export import OUTPUT_NAMES, ShapeRange, export_program, input_names, max_history
from pipeline.integrity import write_digest

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# The exporter's optimizer passes log every rewrite at INFO, and its registry warns about torchvision.
_NOISY_LOGGERS = {"onnx_ir": logging.WARNING, "onnxscript": logging.WARNING,
                  "torch.onnx._internal.exporter._registration": logging.ERROR}


@dataclass(frozen=True)
class OnnxExport:
    """Facts about one exported model, logged by the onnx stage."""

    path: Path
    opset: int
    num_nodes: int
    size_mb: float        # the model file plus its external data, if any
    external_data: bool
    export_seconds: float

    def metrics(self, suffix: str) -> dict[str, float]:
        return {
            f"onnx_opset_{suffix}": self.opset,
            f"onnx_nodes_{suffix}": self.num_nodes,
            f"onnx_size_mb_{suffix}": self.size_mb,
            f"onnx_external_data_{suffix}": float(self.external_data),
            f"export_seconds_{suffix}": self.export_seconds,
            f"onnx_checker_ok_{suffix}": 1.0,  # check_onnx raised otherwise
        }


def export_onnx(retriever: nn.Module, path: Path, opset: int | None, external_data_mb: float) -> OnnxExport:
    """Exports on the CPU (an ONNX file does not depend on the device it was traced on), saves the
    weights as external data (<path>.data) when they exceed external_data_mb, and runs the full check."""
    for name, level in _NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    start = time.perf_counter()
    length = max_history(retriever)
    program = export_program(retriever, ShapeRange(1, 2, None), ShapeRange(1, length, length), torch.device("cpu"))
    try:
        onnx_program = torch.onnx.export(
            program, dynamo=True, opset_version=opset, input_names=input_names(retriever),
            output_names=list(OUTPUT_NAMES), optimize=True, verbose=False,
        )
    except Exception as err:
        raise PipelineError(_export_error(err, opset)) from err
    weights_mb = sum(t.numel() * t.element_size() for t in program.state_dict.values()) / 2**20
    external = weights_mb > external_data_mb
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_file = path.with_name(path.name + ".data")
    data_file.unlink(missing_ok=True)  # never leave weights of an earlier export beside this model
    onnx_program.save(str(path), external_data=external)
    seconds = time.perf_counter() - start
    check_onnx(path)
    write_digest(path)
    return OnnxExport(path, *_graph_facts(path), size_mb=_size_mb(path, data_file), external_data=external,
                      export_seconds=seconds)


def check_onnx(path: Path) -> None:
    """onnx.checker with full_check (shape inference too); given the path, it reads external data as well."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise PipelineError(f"{path} fails onnx.checker (full check): {err}") from err


def _graph_facts(path: Path) -> tuple[int, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return opset, len(model.graph.node)


def _size_mb(path: Path, data_file: Path) -> float:
    return (path.stat().st_size + (data_file.stat().st_size if data_file.exists() else 0)) / 2**20


def _export_error(err: Exception, opset: int | None) -> str:
    """Names the operator(s) the exporter could not translate, found anywhere in the exception chain."""
    texts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        texts.append(str(err))
        err = err.__cause__ or err.__context__
    text = "\n".join(texts)
    ops = {f"{op}.{overload}" for op, overload in re.findall(r"OpOverload\(op='([\w.]+)', overload='(\w+)'\)", text)}
    ops |= set(re.findall(r"target=torch\.ops\.([\w.]+)\]?", text))
    where = f"opset {opset}" if opset else "the default opset"
    if ops:
        return (
            f"the ONNX exporter has no translation for operator(s) {', '.join(sorted(ops))} ({where}); "
            "express that part of the model with other PyTorch ops, or try another onnx.opset"
        )
    first = next((line for line in texts[0].splitlines() if line.strip()), texts[0])
    return f"ONNX export failed ({where}): {first}"


def provider_for(device: torch.device) -> str:
    """The execution provider a variant for this device uses: CUDA when onnxruntime-gpu and a GPU are here."""
    import onnxruntime

    if device.type == "cuda" and CUDA in onnxruntime.get_available_providers():
        return CUDA
    return CPU


class OnnxRetriever:
    """An ONNX Runtime session called like the eager retriever (torch tensors in, torch tensors out)."""

    def __init__(self, path: str | Path, provider: str, num_threads: int | None = None, device_id: int = 0) -> None:
        import onnxruntime

        if provider not in onnxruntime.get_available_providers():
            raise PipelineError(
                f"ONNX Runtime here has no {provider} (available: {', '.join(onnxruntime.get_available_providers())}); "
                "install onnxruntime-gpu for CUDA, or run stage=onnx again on this host"
            )
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: graph-optimizer notices are not for users
        if num_threads:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        providers = [(CUDA, {"device_id": device_id}), CPU] if provider == CUDA else [CPU]
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # onnxruntime's errors share no base class beyond Exception
            if not type(err).__module__.startswith("onnxruntime"):
                raise
            raise PipelineError(f"ONNX Runtime ({provider}) cannot run {path}: {err}") from err
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(
        self, history: torch.Tensor, lengths: torch.Tensor, timestamps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        given = {"history": history, "lengths": lengths, "timestamps": timestamps}
        feeds = {name: given[name].cpu().numpy() for name in self.input_names}
        ids, scores = self.session.run(list(OUTPUT_NAMES), feeds)
        return torch.from_numpy(ids), torch.from_numpy(scores)


def load_onnx_variant(variant: Variant, device: torch.device, top_k: int) -> OnnxRetriever:
    exported_k = variant.options.get("top_k")
    if exported_k != top_k:
        raise PipelineError(
            f"{variant.name} was exported with top_k={exported_k} (K is part of the graph) but {top_k} was asked; "
            f"run stage=onnx again with onnx.top_k={top_k}"
        )
    return OnnxRetriever(
        variant.artifact, variant.options.get("provider", CPU), variant.options.get("num_threads"),
        device.index or 0,
    )
