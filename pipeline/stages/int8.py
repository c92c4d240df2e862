"""int8: calibrated INT8 variants (precision=int8 only; skipped otherwise).

A calibration set of `int8.calibration.num_users` training-split histories (sampled with a seed) is logged to
MLflow as a dataset (name, digest, size). From it, per quantization path, a calibration cache (per-tensor
activation ranges as JSON, with the digests of the model and the data) that a later run reuses instead of
calibrating again (int8.calibration.cache). The variants:

- onnxruntime-int8: ONNX Runtime static INT8 (QDQ, per-channel weights) of the onnx stage's fp32 model, the
  nodes in int8.onnx_qdq.keep_float left in float (default: the final scoring), with a per-layer sensitivity
  sweep (one quantized node at a time) logged as a table;
- torchao-int8: torchao PT2E with the X86 Inductor quantizer, calibrated on the same set, under torch.compile;
- int8_table-triton-int8 (CUDA only): the item table in int8 with per-row scales, scored by the fused retrieval
  kernel (pipeline.quant.int8_table);
- tensorrt-int8 is not built: see SKIPPED_HERE.

Each variant gets the quick parity check of every stage (top-K overlap and score error of gates.int8 on the
sample); validate applies all of gates.int8 to every variant and promote takes passing ones only. One that
fails to build, load or pass the quick check is recorded as failed and left out; the others go on.
"""
from __future__ import annotations

import csv
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Callable

import torch

from pipeline.bench.parity import check_parity, head, load_reference
from pipeline.core import Context, ConfigError, PipelineError, StageResult, Variant, build_variant, file_digest
from pipeline.data import load_splits
from pipeline.evaluation import parity, predict_top_k, top_k_metrics
from pipeline.export.onnx import CPU, OnnxRetriever
from pipeline.gates import gate_for
from pipeline.integrity import verify_digest
from pipeline.quant import int8_table, onnx_qdq, torchao_pt2e
from pipeline.quant.calibration import METHODS, CalibrationCache, CalibrationSet, sample_calibration
from pipeline.variants import build_retriever, load_variant

log = logging.getLogger(__name__)

ONNX_KIND = "onnx_qdq"
# Variants of the issue that this stage does not build, and why (tag skipped_variants).
SKIPPED_HERE = {
    "tensorrt-int8": "not built: TensorRT INT8 goes through NVIDIA ModelOpt and torch_tensorrt, neither of which "
                     "can be installed on this project's machines (see the trt stage); not written, untested",
}


def run(ctx: Context) -> StageResult:
    icfg, cfg = ctx.cfg.int8, ctx.cfg
    if cfg.precision != "int8":
        return StageResult(status="skipped", reason=f"precision={cfg.precision}: INT8 variants are built for precision=int8 only")
    method = icfg.calibration.method
    if method not in METHODS:
        raise PipelineError(f"unknown int8.calibration.method '{method}'; valid choices: {', '.join(METHODS)}")
    checkpoint = str(ctx.require_artifact("checkpoint"))
    out_dir = ctx.run_dir / "int8"
    out_dir.mkdir(parents=True, exist_ok=True)

    splits = load_splits(cfg)
    calib = sample_calibration(splits.train, icfg.calibration.num_users, icfg.calibration.seed, cfg.model.max_len)
    _log_calibration_set(ctx, calib, out_dir)
    sample, reference = load_reference(cfg, ctx.require_artifact("reference_answer"), checkpoint, icfg.top_k)
    gate = gate_for(cfg.gates, "int8")

    metrics: dict[str, float] = {"calibration_num_users": calib.size}
    artifacts: dict[str, str] = {"calibration_users": str(out_dir / "calibration_users.json")}
    variants: list[Variant] = []
    skipped: dict[str, str] = dict(SKIPPED_HERE)
    failures: dict[str, str] = {}

    def checked(variant: Variant) -> dict[str, float]:
        """The variant's quick parity check against fp32 eager (the overlap and score-error parts of its gate)."""
        predict = load_variant(variant, ctx.device, icfg.top_k)
        agreement = check_parity(variant.name, predict, reference, sample, gate, cfg.gates.sample.batch_size, ctx.device)
        log.info("%s: top-K overlap with fp32 eager %.4f, HR@10 %+.4f on %d test users",
                 variant.name, agreement["parity_topk_overlap"], agreement["hr10_delta"], sample.target.shape[0])
        return {f"{key}_{variant.name}": agreement[key] for key in ("parity_topk_overlap", "parity_max_abs_err", "hr10_delta")}

    def build(name: str, make: Callable[[], tuple[Variant, dict[str, float], dict[str, str]]]) -> None:
        """make() -> (variant, its metrics, its artifacts), kept only when building and checking it succeed."""
        built = build_variant(ctx, name, failures, make)
        if built is not None:
            variants.append(built[0])
            metrics.update(built[1])
            artifacts.update(built[2])

    # --- ONNX Runtime static INT8 (QDQ) ---
    if icfg.onnx_qdq.enabled:
        fp32 = next((v for v in ctx.manifest.variants() if v.name == "onnxruntime-fp32"), None)
        if fp32 is None or not Path(fp32.artifact).is_file():
            skipped["onnxruntime-int8"] = "needs the onnx stage's fp32 model: run stage=[onnx,int8] (or stage=all)"
            log.warning("onnxruntime-int8 skipped: %s", skipped["onnxruntime-int8"])
        else:
            def onnx_int8() -> tuple[Variant, dict[str, float], dict[str, str]]:
                variant, facts = _onnx_qdq(ctx, fp32, calib, splits, out_dir)
                return variant, {**facts["metrics"], **checked(variant)}, facts["artifacts"]

            build("onnxruntime-int8", onnx_int8)
    else:
        skipped["onnxruntime-int8"] = "int8.onnx_qdq.enabled=false"

    # --- PyTorch INT8 on the CPU: torchao PT2E + X86 Inductor quantizer + torch.compile ---
    reason = torchao_pt2e.unavailable_reason() if icfg.torchao.enabled else "int8.torchao.enabled=false"
    if reason:
        skipped["torchao-int8"] = reason
        log.warning("torchao-int8 skipped: %s", reason)
    else:
        def torchao_int8() -> tuple[Variant, dict[str, float], dict[str, str]]:
            variant, cache_path = _torchao(ctx, checkpoint, calib, out_dir)
            return variant, checked(variant), {f"calibration_cache_{torchao_pt2e.KIND}": str(cache_path)}

        build("torchao-int8", torchao_int8)

    # --- GPU: the int8 item table with per-row scales, scored by the fused retrieval kernel ---
    # The hook for the GPU part of the issue: built on CUDA only (pipeline/quant/int8_table.py has the loader).
    reason = int8_table.unavailable_reason(ctx.device) if icfg.gpu_int8_table else "int8.gpu_int8_table=false"
    if reason:
        skipped[int8_table.SPEC.name] = reason
    else:
        table = int8_table.SPEC.variant(checkpoint, "int8", top_k=icfg.top_k, table="int8 per-row fp32 scales",
                                        query="bf16")
        build(table.name, lambda: (table, checked(table), {}))

    for name, why in skipped.items():
        log.info("%s not built: %s", name, why)
    ctx.tracker.set_tags({"skipped_variants": "; ".join(f"{n}: {why}" for n, why in skipped.items())[:5000]})
    (out_dir / "int8_variants.json").write_text(json.dumps(
        {"variants": [v.to_dict() for v in variants], "skipped": skipped, "failed": failures, "calibration": {
            "digest": calib.digest, "num_users": calib.size, "seed": calib.seed, "method": method}}, indent=2))
    artifacts["int8_variants"] = str(out_dir / "int8_variants.json")
    metrics["num_variants"] = len(variants)
    return StageResult(metrics=metrics, artifacts=artifacts, variants=variants, failures=failures)


def _log_calibration_set(ctx: Context, calib: CalibrationSet, out_dir: Path) -> None:
    ccfg = ctx.cfg.int8.calibration
    features = {"history": calib.history.numpy(), "lengths": calib.lengths.numpy()}
    if calib.timestamps is not None:
        features["timestamps"] = calib.timestamps.numpy()
    name = f"{ctx.cfg.data.name}-calibration"
    ctx.tracker.log_dataset(features, name=name, digest=calib.digest[:16], context="calibration")
    ctx.tracker.set_tags({"calibration_dataset": name, "calibration_source": f"{ctx.cfg.data.name} training split",
                          "calibration_num_users": calib.size, "calibration_digest": calib.digest,
                          "calibration_method": ccfg.method, "calibration_seed": calib.seed})
    (out_dir / "calibration_users.json").write_text(json.dumps(
        {"dataset": name, "digest": calib.digest, "seed": calib.seed, "split": "train",
         "users": calib.users.tolist()}))


def _find_cache(ctx: Context, kind: str) -> tuple[Path | None, bool]:
    """-> (a cache file to try for this quantization path, whether a mismatch must stop the run)."""
    setting = str(ctx.cfg.int8.calibration.cache)
    if setting == "off":
        return None, False
    if setting == "auto":
        found = ctx.manifest.artifact(f"calibration_cache_{kind}")
        return (Path(found), False) if found and Path(found).is_file() else (None, False)
    path = Path(setting)
    if path.is_dir():
        candidate = path / f"calibration-{kind}.json"
        return (candidate, True) if candidate.is_file() else (None, True)
    if not path.is_file():
        raise ConfigError(f"int8.calibration.cache={setting}: no such file or folder (auto, off, or a cache path)")
    return (path, True) if CalibrationCache.load(path).kind == kind else (None, True)


def _reuse(ctx: Context, kind: str, model_digest: str, data_digest: str, method: str) -> CalibrationCache | None:
    """The cache to reuse for this path, or None to calibrate. An explicitly given cache that does not match
    (or is corrupt) stops the stage; one found automatically is only reused when it matches."""
    path, strict = _find_cache(ctx, kind)
    if path is None:
        ctx.tracker.set_tags({f"calibration_cache_{kind}": "calibrated"})
        return None
    try:
        cache = CalibrationCache.load(path)
        cache.check(kind=kind, model_digest=model_digest, data_digest=data_digest, method=method, source=str(path))
    except PipelineError as err:
        if strict:
            raise ConfigError(f"int8.calibration.cache={ctx.cfg.int8.calibration.cache}: {err}") from err
        log.info("not reusing the earlier calibration cache: %s", err)
        ctx.tracker.set_tags({f"calibration_cache_{kind}": f"calibrated (earlier cache not reused: {err})"[:5000]})
        return None
    log.info("%s: reusing calibration cache %s (no calibration)", kind, path)
    ctx.tracker.set_tags({f"calibration_cache_{kind}": f"reused {path}"})
    return cache


def _onnx_qdq(ctx: Context, fp32: Variant, calib: CalibrationSet, splits, out_dir: Path) -> tuple[Variant, dict]:
    icfg = ctx.cfg.int8
    qcfg, method = icfg.onnx_qdq, icfg.calibration.method
    if fp32.options.get("top_k") != icfg.top_k:
        raise ConfigError(f"the onnx stage exported top_k={fp32.options.get('top_k')}, int8.top_k is {icfg.top_k}: "
                            "run stage=[onnx,int8] with the same K")
    settings = onnx_qdq.QdqSettings.from_config(qcfg, method)
    source = Path(fp32.artifact)
    verify_digest(source)
    model_digest = file_digest([source, *sorted(source.parent.glob(source.name + ".data"))])
    path = out_dir / "retriever-int8-qdq.onnx"
    metrics: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="genrec-int8-") as tmp:
        pre = onnx_qdq.preprocess(source, Path(tmp) / "preprocessed.onnx")
        cache = _reuse(ctx, ONNX_KIND, model_digest, calib.digest, method)
        if cache is None:
            ranges = onnx_qdq.calibrate(pre, calib, method, settings.op_types, icfg.calibration.batch_size,
                                        icfg.calibration.percentile)
            cache = CalibrationCache(ONNX_KIND, method, model_digest, calib.digest, calib.size, calib.seed, ranges)
            metrics["calibrated_onnx_qdq"] = 1.0
        else:
            metrics["calibrated_onnx_qdq"] = 0.0
        cache_path = cache.save(out_dir / f"calibration-{ONNX_KIND}.json")
        keep_float = onnx_qdq.keep_float_nodes(pre, list(qcfg.keep_float))
        onnx_qdq.quantize(pre, path, cache.ranges, settings, nodes_to_exclude=keep_float)
        artifacts = {f"calibration_cache_{ONNX_KIND}": str(cache_path), "int8_onnx": str(path)}
        if icfg.sensitivity.enabled:
            rows = _sensitivity(ctx, pre, Path(tmp), cache, settings, keep_float, path, splits, source)
            artifacts.update(_write_sensitivity(rows, out_dir))
            metrics.update(_sensitivity_metrics(rows))
    metrics.update({"onnx_qdq_quantize_linear_nodes": len(onnx_qdq.quantizable_nodes(path, ("QuantizeLinear",), ())),
                    "onnx_qdq_nodes_kept_float": len(keep_float), "onnx_qdq_size_mb": path.stat().st_size / 2**20,
                    "calibration_tensors_onnx_qdq": len(cache.ranges)})
    ctx.tracker.set_tags({"onnx_qdq_keep_float": ",".join(keep_float)[:5000]})
    variant = Variant("onnxruntime-int8", "onnxruntime", "int8", str(path), "int8", options={
        "provider": CPU, "top_k": icfg.top_k, "num_threads": qcfg.num_threads, "format": "QDQ",
        "per_channel": settings.per_channel, "calibration_method": method, "keep_float": keep_float,
        "activation_type": settings.activation_type, "weight_type": settings.weight_type,
    })
    return variant, {"metrics": metrics, "artifacts": artifacts}


def _sensitivity(ctx: Context, pre: Path, work_dir: Path, cache: CalibrationCache, settings, keep_float: list[str],
                 full_model: Path, splits, source: Path) -> list[dict]:
    """One quantized node at a time against fp32 eager on the first validation users; the full INT8 model
    as the last row."""
    scfg, threads = ctx.cfg.int8.sensitivity, ctx.cfg.int8.onnx_qdq.num_threads
    cpu = torch.device("cpu")
    sample = head(splits.valid, scfg.num_users)
    fp32 = build_retriever(str(ctx.require_artifact("checkpoint")), ctx.cfg.int8.top_k, "fp32", cpu)
    ref_ids, ref_scores = predict_top_k(fp32, sample, scfg.batch_size, cpu)
    ref_hr10 = top_k_metrics(ref_ids, sample.target, ks=(10,))["hr10"]

    def evaluate(path: Path) -> dict[str, float]:
        ids, scores = predict_top_k(OnnxRetriever(path, CPU, threads), sample, scfg.batch_size, cpu)
        return {"topk_overlap": parity(ids, scores, ref_ids, ref_scores)["parity_topk_overlap"],
                "hr10_delta": top_k_metrics(ids, sample.target, ks=(10,))["hr10"] - ref_hr10}

    rows = onnx_qdq.sensitivity_sweep(pre, work_dir, cache.ranges, settings, keep_float, evaluate, labels_from=source)
    whole = evaluate(full_model)
    rows.append({"node": "(all of them: onnxruntime-int8)", "op_type": "", "module": "", **whole,
                 "overlap_loss": 1.0 - whole["topk_overlap"]})
    return rows


def _write_sensitivity(rows: list[dict], out_dir: Path) -> dict[str, str]:
    columns = onnx_qdq.SENSITIVITY_COLUMNS
    csv_path, md_path = out_dir / "sensitivity.csv", out_dir / "sensitivity.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["Per-layer sensitivity: each row quantizes one node (all others float) and compares its top-K "
             "with fp32 eager on validation users; the costliest first.", "",
             "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return {"sensitivity_table": str(csv_path), "sensitivity_table_md": str(md_path)}


def _sensitivity_metrics(rows: list[dict]) -> dict[str, float]:
    single = [r for r in rows if r["op_type"]]
    metrics = {}
    for r in single:
        key = re.sub(r"[^\w.\-/ ]", "_", r["node"])
        metrics[f"sensitivity_overlap_loss.{key}"] = r["overlap_loss"]
        metrics[f"sensitivity_hr10_delta.{key}"] = r["hr10_delta"]
    if single:
        metrics["sensitivity_max_overlap_loss"] = max(r["overlap_loss"] for r in single)
    metrics["sensitivity_nodes"] = len(single)
    return metrics


def _torchao(ctx: Context, checkpoint: str, calib: CalibrationSet, out_dir: Path) -> tuple[Variant, Path]:
    icfg = ctx.cfg.int8
    kind = torchao_pt2e.KIND
    cache = _reuse(ctx, kind, file_digest([Path(checkpoint)]), calib.digest, torchao_pt2e.METHOD)
    _, cache, names = torchao_pt2e.build(checkpoint, icfg.top_k, calib, icfg.calibration.batch_size, cache)
    folder = torchao_pt2e.write_variant_dir(out_dir / "torchao-int8", checkpoint, cache)
    variant = Variant("torchao-int8", "torchao", "int8", str(folder), "int8", options={
        "top_k": icfg.top_k, "quantizer": "X86InductorQuantizer (static, per-channel weights)",
        "observer": torchao_pt2e.METHOD, "inputs": names,
    })
    return variant, folder / torchao_pt2e.CACHE
