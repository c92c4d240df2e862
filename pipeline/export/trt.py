"""Torch-TensorRT (dynamo path, torch_tensorrt 2.11 to 2.13): shape ranges and compile settings from the
config, the dry-run coverage report, the Triton tensorrt_plan model (engine + config.pbtxt), and loading
a saved program as a variant.

Only the functions that call torch_tensorrt or tensorrt need them; they import them when called.
Precision: TensorRT >= 10.12 is strongly typed, so a variant's precision is the dtype of the program it is
compiled from (the retriever in fp16 for tensorrt-fp16). torch_tensorrt 2.11 accepts enabled_precisions
only as {float32} under its default use_explicit_typing=True, and 2.13 has no such argument.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from pipeline.core import PipelineError, Variant
from pipeline.export import ShapeRange, dynamic_shapes
from pipeline.integrity import write_digest

PLAN_FILE = "model.plan"
# TensorRT DataType names -> Triton data types.
TRITON_DTYPES = {"FLOAT": "TYPE_FP32", "HALF": "TYPE_FP16", "BF16": "TYPE_BF16", "INT64": "TYPE_INT64",
                 "INT32": "TYPE_INT32", "INT8": "TYPE_INT8", "BOOL": "TYPE_BOOL"}


def unavailable_reason(device: torch.device) -> str | None:
    """Why TensorRT cannot run here (no CUDA device, no torch_tensorrt), or None when it can."""
    reasons = []
    if device.type != "cuda":
        reasons.append(
            "no CUDA device (torch.cuda.is_available() is False)" if not torch.cuda.is_available()
            else f"device={device.type}: TensorRT needs device=cuda or device=auto"
        )
    if importlib.util.find_spec("torch_tensorrt") is None:
        reasons.append("torch_tensorrt is not installed (pip install -e '.[trt]' on a CUDA host with TensorRT)")
    elif not reasons:
        try:
            import torch_tensorrt  # noqa: F401
        except (ImportError, OSError) as err:  # OSError: the TensorRT shared libraries are missing
            reasons.append(f"torch_tensorrt does not import: {err}")
    return "TensorRT cannot run here: " + "; ".join(reasons) if reasons else None


def shape_ranges(tcfg: Any, max_len: int) -> tuple[ShapeRange, ShapeRange]:
    """(batch, history length) ranges of the engines from trt.batch and trt.history (null -> model.max_len)."""
    batch = ShapeRange(tcfg.batch.min, tcfg.batch.opt, tcfg.batch.max).check("trt.batch")
    history = ShapeRange(
        tcfg.history.min,
        max_len if tcfg.history.opt is None else tcfg.history.opt,
        max_len if tcfg.history.max is None else tcfg.history.max,
    ).check("trt.history")
    if history.max > max_len:
        raise PipelineError(
            f"trt.history.max={history.max} exceeds model.max_len={max_len}; histories are capped to max_len"
        )
    return batch, history


def input_specs(names: list[str], batch: ShapeRange, history: ShapeRange) -> list[dict[str, Any]]:
    """Keyword arguments of one torch_tensorrt.Input per retriever input (all int64)."""
    dims = {"history": (batch, history), "lengths": (batch,), "timestamps": (batch, history)}
    return [
        {
            "name": name,
            "min_shape": tuple(r.min for r in dims[name]),
            "opt_shape": tuple(r.opt for r in dims[name]),
            "max_shape": tuple(r.max for r in dims[name]),
            "dtype": torch.int64,
        }
        for name in names
    ]


def resolve_op(name: str) -> torch._ops.OpOverload:
    """'aten.topk.default' -> torch.ops.aten.topk.default; an unknown name stops with what was expected."""
    parts = name.removeprefix("torch.ops.").split(".")
    try:
        namespace, op, overload = parts
        return getattr(getattr(getattr(torch.ops, namespace), op), overload)
    except (ValueError, AttributeError, RuntimeError) as err:
        raise PipelineError(
            f"trt.torch_executed_ops: '{name}' is not an operator overload; write namespace.op.overload, "
            "e.g. aten.topk.default"
        ) from err


def compile_settings(tcfg: Any, precision: str, device: torch.device) -> dict[str, Any]:
    """Keyword arguments shared by torch_tensorrt.dynamo.compile and
    convert_exported_program_to_serialized_trt_engine, from the trt config group."""
    cache_dir = Path(tcfg.engine_cache_dir)
    settings = {
        "device": device,
        "min_block_size": tcfg.min_block_size,
        "torch_executed_ops": {resolve_op(name) for name in tcfg.torch_executed_ops},
        "require_full_compilation": tcfg.require_full_compilation,
        "cache_built_engines": tcfg.engine_cache,
        "reuse_cached_engines": tcfg.engine_cache,
        "engine_cache_dir": str(cache_dir),
        "timing_cache_path": str(cache_dir / "timing_cache.bin"),
        "workspace_size": tcfg.workspace_size,
        "optimization_level": tcfg.optimization_level,
        # fp32 accumulation for fp16 matmuls; it changes nothing for other precisions.
        "use_fp32_acc": precision == "fp16" and tcfg.fp16_fp32_accumulation,
        "disable_tf32": not tcfg.tf32,
    }
    if settings["require_full_compilation"] and settings["torch_executed_ops"]:
        raise PipelineError("trt.require_full_compilation=true leaves no room for trt.torch_executed_ops; drop one")
    return settings


def dry_run(compile_fn: Callable[..., Any], program: Any, inputs: list, settings: Mapping[str, Any]) -> str:
    """The coverage report of compile(..., dryrun=True): which ops TensorRT runs, which fall back to PyTorch.

    The dry run never stops at a fallback (require_full_compilation off), so the report lists them all.
    """
    import contextlib
    import io

    report = io.StringIO()
    with contextlib.redirect_stdout(report):  # torch_tensorrt prints the dry-run report
        compile_fn(program, arg_inputs=inputs, **{**settings, "require_full_compilation": False}, dryrun=True)
    return report.getvalue()


def coverage(report: str) -> dict[str, float]:
    """Numbers of a dry-run report: ops in the graph, ops TensorRT supports, their share, engines."""
    totals = re.search(r"consists of (\d+) Total Operators, of which (\d+) operators are supported", report)
    if totals is None:
        raise PipelineError("torch_tensorrt's dry run printed no coverage report; see the stage log")
    total, supported = int(totals.group(1)), int(totals.group(2))
    return {
        "trt_ops_total": total,
        "trt_ops_supported": supported,
        "trt_op_coverage": supported / total if total else 0.0,
        "trt_engines": len(re.findall(r"TRT Engine #\d+", report)),
    }


def unsupported_ops(report: str) -> list[str]:
    """Operators a dry-run report lists as unsupported or excluded."""
    block = re.search(r"unsupported or excluded from conversion.*?:\n(.*?)\n\n", report, re.S)
    return [line.split(":")[0].strip() for line in block.group(1).splitlines() if line.strip()] if block else []


@dataclass(frozen=True)
class EngineTensor:
    """One input or output of a serialized engine, as TensorRT reports it (-1 marks a dynamic dimension)."""

    name: str
    is_input: bool
    data_type: str  # Triton's name, e.g. TYPE_INT64
    shape: tuple[int, ...]


def engine_io(plan: bytes) -> list[EngineTensor]:
    """The inputs and outputs of a serialized engine, read back with the TensorRT runtime."""
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    if engine is None:
        raise PipelineError("TensorRT could not deserialize the engine it just built")
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = engine.get_tensor_dtype(name).name
        if dtype not in TRITON_DTYPES:
            raise PipelineError(f"engine tensor {name} has type {dtype}, which this Triton config writer does not map")
        tensors.append(EngineTensor(name, engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                                    TRITON_DTYPES[dtype], tuple(engine.get_tensor_shape(name))))
    return tensors


def plan_config(name: str, tensors: list[EngineTensor], triton: Any) -> str:
    """config.pbtxt of a tensorrt_plan model serving the engine, parsed back with Triton's own schema.

    Dimension 0 of every engine tensor is the batch, which Triton owns (max_batch_size); a tensor that is
    only the batch (lengths [B]) is declared as [1] and reshaped to [] for the engine.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    config = pb.ModelConfig(name=name, platform="tensorrt_plan", max_batch_size=triton.max_batch_size,
                            default_model_filename=PLAN_FILE)
    for tensor in tensors:
        if not tensor.shape or tensor.shape[0] != -1:
            raise PipelineError(f"engine tensor {tensor.name} has shape {tensor.shape}: Triton batching needs a dynamic dimension 0")
        entry = (config.input if tensor.is_input else config.output).add()
        entry.name, entry.data_type = tensor.name, pb.DataType.Value(tensor.data_type)
        dims = list(tensor.shape[1:])
        entry.dims.extend(dims or [1])
        if not dims:
            entry.reshape.SetInParent()  # shape [] : the engine takes [B]
    group = config.instance_group.add()
    group.kind, group.count = pb.ModelInstanceGroup.KIND_GPU, triton.instance_count
    config.dynamic_batching.preferred_batch_size.extend(triton.preferred_batch_sizes)
    config.dynamic_batching.max_queue_delay_microseconds = triton.max_queue_delay_microseconds
    text = text_format.MessageToString(config)
    text_format.Parse(text, pb.ModelConfig())
    return text


def write_plan_model(repository: Path, name: str, plan: bytes, config_text: str) -> Path:
    """<repository>/<name>/config.pbtxt and <repository>/<name>/1/model.plan, Triton's layout."""
    model_dir = Path(repository) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / PLAN_FILE).write_bytes(plan)
    (model_dir / "config.pbtxt").write_text(config_text)
    return model_dir


def save_program(trt_module: Any, path: Path, example: tuple, names: list[str], batch: ShapeRange,
                 history: ShapeRange) -> Path:
    """The compiled module as an ExportedProgram (.ep) that torch_tensorrt.load reads back."""
    import torch_tensorrt

    torch_tensorrt.save(trt_module, str(path), output_format="exported_program", arg_inputs=list(example),
                        dynamic_shapes=dynamic_shapes(names, batch, history), retrace=True)
    write_digest(path)
    return Path(path)


def load_trt_variant(variant: Variant, device: torch.device, top_k: int) -> Callable:
    """A saved Torch-TensorRT program, called like the eager retriever."""
    if variant.options.get("top_k") != top_k:
        raise PipelineError(
            f"{variant.name} was compiled with top_k={variant.options.get('top_k')} but {top_k} was asked; "
            f"run stage=trt again with trt.top_k={top_k}"
        )
    reason = unavailable_reason(device)
    if reason:
        raise PipelineError(f"cannot load {variant.name}: {reason}")
    import torch_tensorrt

    module = torch_tensorrt.load(variant.artifact).module()
    names, width = variant.options["inputs"], variant.options["history_max"]

    def predict(history: torch.Tensor, lengths: torch.Tensor, timestamps: torch.Tensor | None = None):
        if history.size(1) > width:
            # Cutting right padding changes no score: both encoders mask padded positions.
            if int(lengths.max()) > width:
                raise PipelineError(f"{variant.name} takes histories of at most {width} items; raise trt.history.max")
            history = history[:, :width]
            timestamps = None if timestamps is None else timestamps[:, :width]
        given = {"history": history, "lengths": lengths, "timestamps": timestamps}
        return module(*(given[name] for name in names))

    return predict
