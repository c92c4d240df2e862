"""onnx: the retriever exported with the dynamo exporter (dynamic batch and history length, history
filtering and top-K inside the graph), checked with onnx.checker, and one ONNX Runtime variant per
precision that passes a quick parity check against fp32 eager. fp32 always; the target precision (fp16,
bf16) when ONNX Runtime runs it here, else the stage says why and builds nothing in its place. A variant
that fails to export, load or pass the check is recorded as failed and left out. validate then measures
these variants exactly like the others."""
from __future__ import annotations

import json
import logging

import torch

from pipeline.bench.parity import check_parity, load_reference
from pipeline.core import Context, PipelineError, StageResult, Variant, build_variant
from pipeline.export.onnx import CUDA, OnnxRetriever, export_onnx, provider_for
from pipeline.gates import gate_for
from pipeline.variants import build_retriever

log = logging.getLogger(__name__)

REDUCED = ("fp16", "bf16")


def run(ctx: Context) -> StageResult:
    ocfg, device = ctx.cfg.onnx, ctx.device
    checkpoint = str(ctx.require_artifact("checkpoint"))
    provider = provider_for(device)
    if device.type == "cuda" and provider != CUDA:
        log.warning("onnxruntime here has no CUDA provider (install onnxruntime-gpu): the ONNX variants run on the CPU")
    if ctx.cfg.precision == "int8":
        log.info("precision=int8: INT8 variants come from the int8 stage; exporting fp32 only")
    precisions = ["fp32", *([ctx.cfg.precision] if ctx.cfg.precision in REDUCED else [])]

    cpu = torch.device("cpu")
    sample, reference = load_reference(ctx.cfg, ctx.require_artifact("reference_answer"), checkpoint, ocfg.top_k)

    out_dir = ctx.run_dir / "onnx"
    ctx.tracker.set_tags({"onnx_provider": provider})
    metrics: dict[str, float] = {}
    variants, facts, skipped, failures = [], {}, {}, {}
    for precision in precisions:
        name = f"onnxruntime-{precision}"

        def onnx_variant() -> Variant | None:
            try:
                # Exported from plain PyTorch on the CPU: custom kernels never enter the graph (pipeline.export).
                retriever = build_retriever(checkpoint, ocfg.top_k, precision, cpu)
                export = export_onnx(retriever, out_dir / f"retriever-{precision}.onnx", ocfg.opset, ocfg.external_data_mb)
                predict = OnnxRetriever(export.path, provider, ocfg.num_threads, device.index or 0)
            except PipelineError as err:
                if precision == "fp32":
                    raise
                skipped[name] = str(err)
                log.warning("%s skipped: %s", name, err)
                for leftover in out_dir.glob(f"retriever-{precision}.onnx*"):
                    leftover.unlink()  # a model that does not run here is no artifact
                return None
            agreement = check_parity(name, predict, reference, sample, gate_for(ctx.cfg.gates, precision),
                                     ctx.cfg.gates.sample.batch_size, cpu)
            metrics.update(export.metrics(precision))
            metrics.update({f"{key}_{precision}": value for key, value in agreement.items()})
            facts[name] = {"path": str(export.path), "provider": provider, **export.metrics(precision),
                           **{key: agreement[key] for key in ("parity_topk_overlap", "parity_max_abs_err", "hr10_delta")}}
            log.info("%s: %d nodes, opset %d, %.1f MB, exported in %.1f s; top-K overlap %.4f, max abs err %.2g",
                     name, export.num_nodes, export.opset, export.size_mb, export.export_seconds,
                     agreement["parity_topk_overlap"], agreement["parity_max_abs_err"])
            return Variant(name, "onnxruntime", precision, str(export.path), "onnx", options={
                "provider": provider, "top_k": ocfg.top_k, "num_threads": ocfg.num_threads, "opset": export.opset,
            })

        variant = build_variant(ctx, name, failures, onnx_variant)
        if variant is not None:
            variants.append(variant)

    if skipped:
        ctx.tracker.set_tags({"skipped_variants": "; ".join(f"{n}: {reason}" for n, reason in skipped.items())[:5000]})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "exports.json").write_text(json.dumps({"variants": facts, "skipped": skipped, "failed": failures}, indent=2))
    metrics["num_variants"] = len(variants)
    return StageResult(metrics=metrics, artifacts={"onnx_dir": str(out_dir)}, variants=variants, failures=failures)
