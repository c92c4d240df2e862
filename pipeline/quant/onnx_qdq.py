"""ONNX Runtime static INT8 (QDQ) from the onnx stage's fp32 model: pre-processing, calibration with the
calibration set (MinMax, Entropy or Percentile), per-channel weights, chosen nodes kept in float, and the
per-layer sensitivity sweep (one quantized node at a time against fp32).

Calibrated ranges live in our calibration cache (pipeline.quant.calibration); quantize() hands them to
onnxruntime.quantization.quantize_static through its own calibration-cache file, so the same ranges give
the same model without running the calibrator again.
"""
from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.core import ConfigError, PipelineError
from pipeline.integrity import write_digest
from pipeline.quant.calibration import CalibrationSet

log = logging.getLogger(__name__)

SCORING = "scoring"  # keep_float keyword: the query x item-table MatMul that feeds the history filter and top-K
QUANT_TYPES = ("qint8", "quint8")


def _ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise PipelineError(f"unknown calibration method '{method}'; valid choices: {', '.join(methods)}")
    return methods[method]


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    if name not in QUANT_TYPES:
        raise PipelineError(f"unknown quantized type '{name}'; valid choices: {', '.join(QUANT_TYPES)}")
    return QuantType.QInt8 if name == "qint8" else QuantType.QUInt8


def preprocess(src: Path, dst: Path) -> Path:
    """onnxruntime's quantization pre-processing (ONNX shape inference and graph optimization). Its symbolic
    shape inference stops on the exporter's dynamic top-K, so it is skipped; ONNX shape inference runs."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception as err:
        raise PipelineError(f"ONNX Runtime's quantization pre-processing failed on {src}: {type(err).__name__}: {err}") from err
    return dst


def input_names(model_path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over the calibration set."""

    def __init__(self, calib: CalibrationSet, names: Sequence[str], batch_size: int) -> None:
        batches = list(calib.batches(batch_size))
        missing = [n for n in names if n not in batches[0]]
        if missing:
            raise PipelineError(f"the model wants input(s) {missing} that the calibration set does not have")
        self._feeds = iter([{n: b[n].numpy() for n in names} for b in batches])

    def get_next(self):
        return next(self._feeds, None)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def calibrate(model_path: Path, calib: CalibrationSet, method: str, op_types: Sequence[str], batch_size: int,
              percentile: float = 99.999) -> dict[str, list[float]]:
    """Runs ONNX Runtime's calibrator over the calibration set -> {tensor: [min, max]} for the inputs and
    outputs of the nodes of `op_types` (the tensors quantize() needs)."""
    from onnxruntime.quantization.calibrate import TensorsData, create_calibrator

    extra = {"percentile": float(percentile)} if method == "percentile" else {}
    with tempfile.TemporaryDirectory(prefix="genrec-calib-") as tmp:
        calibrator = create_calibrator(Path(model_path), list(op_types), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=_ort_method(method), extra_options=extra)
        calibrator.collect_data(_Reader(calib, input_names(model_path), batch_size))
        data = calibrator.compute_data()
    if not isinstance(data, TensorsData):
        raise PipelineError(f"ONNX Runtime's {method} calibrator returned {type(data).__name__}, not tensor ranges")
    ranges = {}
    for name, tensor in data.data.items():
        low, high = (float(np.asarray(v).reshape(-1)[0]) for v in tensor.range_value)
        if not (np.isfinite(low) and np.isfinite(high)):
            raise PipelineError(f"calibration range of tensor {name} is not finite ({low}, {high}); "
                                "leave its node in float (int8.onnx_qdq.keep_float)")
        ranges[name] = [low, high]
    return dict(sorted(ranges.items()))


@dataclass(frozen=True)
class QdqSettings:
    method: str
    op_types: tuple[str, ...]
    per_channel: bool
    activation_type: str
    weight_type: str
    reduce_range: bool

    @classmethod
    def from_config(cls, qcfg, method: str) -> "QdqSettings":
        _ort_method(method), _quant_type(qcfg.activation_type), _quant_type(qcfg.weight_type)  # validate early
        return cls(method, tuple(qcfg.op_types), bool(qcfg.per_channel), qcfg.activation_type, qcfg.weight_type,
                   bool(qcfg.reduce_range))


def quantize(model_path: Path, out_path: Path, ranges: dict[str, list[float]], settings: QdqSettings,
             nodes_to_exclude: Sequence[str] = (), nodes_to_quantize: Sequence[str] | None = None) -> Path:
    """quantize_static (QDQ) with the given ranges (no calibration runs here)."""
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    method = _ort_method(settings.method)
    data = TensorsData(method, {name: TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
                                for name, (lo, hi) in ranges.items()})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="genrec-qdq-") as tmp:
        ort_cache = Path(tmp) / "ranges.json"
        save_tensors_data(data, ort_cache)
        try:
            quantize_static(
                str(model_path), str(out_path), None, quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(settings.op_types), per_channel=settings.per_channel,
                reduce_range=settings.reduce_range, activation_type=_quant_type(settings.activation_type),
                weight_type=_quant_type(settings.weight_type),
                nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize is not None else None,
                nodes_to_exclude=list(nodes_to_exclude), calibrate_method=method, calibration_cache_path=ort_cache,
            )
        except (KeyError, ValueError) as err:
            raise PipelineError(f"ONNX Runtime could not quantize {model_path} with these ranges: {err} "
                                "(a cache from another model?)") from err
    write_digest(out_path)
    return out_path


def keep_float_nodes(model_path: Path, patterns: Sequence[str]) -> list[str]:
    """Node names kept in float: SCORING (the MatMul or Gemm whose output reaches the top-K through the
    history filter), or regular expressions searched in each node's name and its module path."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    keep: list[str] = []
    for pattern in patterns:
        if pattern == SCORING:
            keep += _scoring_nodes(graph)
            continue
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"int8.onnx_qdq.keep_float: '{pattern}' is not a regular expression: {err}") from err
        found = [n.name for n in graph.node if regex.search(n.name) or regex.search(module_path(n))]
        if not found:
            raise ConfigError(f"int8.onnx_qdq.keep_float: '{pattern}' matches no node of {model_path.name}")
        keep += found
    return list(dict.fromkeys(keep))


def _scoring_nodes(graph) -> list[str]:
    producer = {out: node for node in graph.node for out in node.output}
    topk = [n for n in graph.node if n.op_type == "TopK"]
    if not topk:
        raise PipelineError("keep_float 'scoring': the model has no TopK node (not a retriever export?)")
    found, frontier, seen = [], [topk[0].input[0]], set()
    while frontier:  # walk back from the top-K's scores through element-wise ops to the scoring matmul
        node = producer.get(frontier.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            found.append(node.name)
        else:
            frontier.append(node.input[0])
    if not found:
        raise PipelineError("keep_float 'scoring': no MatMul or Gemm leads to the model's TopK")
    return found


def module_path(node) -> str:
    """'encoder.layers.0.uvqk/linear': the PyTorch module and FX node an exported node came from
    ('retriever/<node>' outside submodules), from the dynamo exporter's metadata; else the ONNX name."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = [part.split(":")[0].strip() for part in meta.get("namespace", "").split("/") if part.strip()]
    if not scopes:
        return node.name
    modules = [s for s in scopes[:-1] if s]
    return f"{modules[-1] if modules else 'retriever'}/{scopes[-1]}"


def quantizable_nodes(model_path: Path, op_types: Sequence[str], exclude: Sequence[str],
                      labels_from: Path | None = None) -> list[tuple[str, str, str]]:
    """(node name, op type, module path) of every node that quantize() would quantize. labels_from: the
    exported model to read module paths from (pre-processing may drop the exporter's metadata)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    labels = {}
    if labels_from is not None:
        labels = {n.name: module_path(n) for n in onnx.load(str(labels_from), load_external_data=False).graph.node}
    return [(n.name, n.op_type, labels.get(n.name) or module_path(n))
            for n in graph.node if n.op_type in op_types and n.name not in exclude]


SENSITIVITY_COLUMNS = ("node", "op_type", "module", "topk_overlap", "overlap_loss", "hr10_delta")


def sensitivity_sweep(model_path: Path, work_dir: Path, ranges: dict[str, list[float]], settings: QdqSettings,
                      keep_float: Sequence[str], evaluate: Callable[[Path], dict[str, float]],
                      labels_from: Path | None = None) -> list[dict]:
    """Quantizes one node at a time (all others in float) and measures each model with
    evaluate(path) -> {"topk_overlap", "hr10_delta"} against fp32. Rows sorted by cost: the largest
    top-K overlap loss first (ties: the largest HR@10 drop first)."""
    rows = []
    for i, (name, op_type, module) in enumerate(quantizable_nodes(model_path, settings.op_types, keep_float, labels_from)):
        path = quantize(model_path, work_dir / f"single-{i}.onnx", ranges, settings, nodes_to_quantize=[name])
        measured = evaluate(path)
        rows.append({"node": name, "op_type": op_type, "module": module, "topk_overlap": measured["topk_overlap"],
                     "overlap_loss": 1.0 - measured["topk_overlap"], "hr10_delta": measured["hr10_delta"]})
        for leftover in work_dir.glob(f"single-{i}.onnx*"):
            leftover.unlink()
    return sorted(rows, key=lambda r: (-r["overlap_loss"], r["hr10_delta"]))
