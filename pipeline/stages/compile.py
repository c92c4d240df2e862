"""compile: torch.compile variants of the retriever (mode x kernels, from conf/compile) and an
AOTInductor package (.pt2) that a fresh process loads without the model's Python code. Each variant is
compiled, timed (compile seconds) and checked against fp32 eager on a few test users; a broken one fails
the stage here rather than in validate, which then measures every variant like the others."""
from __future__ import annotations

import json
import logging

import torch

from pipeline import kernels
from pipeline.bench.parity import check_parity, load_reference
from pipeline.core import Context, PipelineError, StageResult, Variant
from pipeline.evaluation import parity
from pipeline.gates import gate_for
from pipeline.export import ShapeRange
from pipeline.export.inductor import (
    AotiRetriever,
    CompiledRetriever,
    package_aoti,
    run_in_fresh_process,
    timed_first_call,
    uses_timestamps,
)
from pipeline.variants import build_retriever

log = logging.getLogger(__name__)


def run(ctx: Context) -> StageResult:
    ccfg, device = ctx.cfg.compile, ctx.device
    checkpoint = str(ctx.require_artifact("checkpoint"))
    precision = ctx.cfg.precision if ctx.cfg.precision in ("fp16", "bf16") else "fp32"
    batch_size = ctx.cfg.gates.sample.batch_size
    sample, reference = load_reference(ctx.cfg, ctx.require_artifact("reference_answer"), checkpoint, ccfg.top_k)
    first_batch = _batch(sample, batch_size, device)

    metrics: dict[str, float] = {}
    variants, facts, skipped = [], {}, {}
    for entry in ccfg.inductor[device.type]:
        mode, kernel_backend = entry.get("mode", "default"), entry.get("kernels", ccfg.kernels)
        entry_precision = entry.get("precision", precision)
        if entry_precision not in ("fp32", "fp16", "bf16"):
            raise PipelineError(f"compile.inductor entry {dict(entry)}: precision must be fp32, fp16 or bf16")
        cuda_graph = bool(entry.get("cuda_graph", False))
        name = "-".join(["inductor", *([mode] if mode != "default" else []), *(["graph"] if cuda_graph else []),
                         *(["triton"] if kernel_backend == "triton" else []), entry_precision])
        if kernel_backend == "triton" and not kernels.triton_runs_on(device):
            skipped[name] = "Triton kernels need a CUDA device"
            log.warning("%s skipped: %s", name, skipped[name])
            continue
        predict = CompiledRetriever(build_retriever(checkpoint, ccfg.top_k, entry_precision, device), mode,
                                    kernel_backend, cuda_graph=cuda_graph)
        seconds = timed_first_call(predict, first_batch)
        agreement = check_parity(name, predict, reference, sample, gate_for(ctx.cfg.gates, entry_precision),
                                 batch_size, device)
        facts[name] = _record(metrics, name, seconds, agreement)
        variants.append(Variant(name, "inductor", entry_precision, checkpoint, "compile",
                                options={"mode": mode, "kernels": kernel_backend, "top_k": ccfg.top_k,
                                         "cuda_graph": cuda_graph}))

    if device.type in ccfg.aoti.devices:
        name = f"aoti-{precision}"
        retriever = build_retriever(checkpoint, ccfg.top_k, precision, device)
        width = sample.history.shape[1]
        package, seconds = package_aoti(
            retriever, ctx.run_dir / "aoti" / f"retriever-{precision}.pt2",
            ShapeRange(**ccfg.aoti.batch).check("compile.aoti.batch"), ShapeRange(1, width, width), device,
        )
        timestamps = uses_timestamps(retriever)
        agreement = check_parity(name, AotiRetriever(package, device, timestamps), reference, sample,
                                 gate_for(ctx.cfg.gates, precision), batch_size, device)
        agreement["fresh_process_topk_overlap"] = _fresh_process_overlap(package, first_batch, timestamps, ctx)
        if agreement["fresh_process_topk_overlap"] < 1.0:
            raise PipelineError(f"{name}: reloaded in a fresh process it answers differently "
                                f"(top-K overlap {agreement['fresh_process_topk_overlap']:.4f} with this process)")
        facts[name] = {"path": str(package), **_record(metrics, name, seconds, agreement)}
        variants.append(Variant(name, "aoti", precision, str(package), "compile",
                                options={"top_k": ccfg.top_k, "uses_timestamps": timestamps}))

    if skipped:
        ctx.tracker.set_tags({"skipped_variants": "; ".join(f"{n}: {why}" for n, why in skipped.items())[:5000]})
    out = ctx.run_dir / "compile.json"
    out.write_text(json.dumps({"variants": facts, "skipped": skipped}, indent=2))
    metrics["num_variants"] = len(variants)
    return StageResult(metrics=metrics, artifacts={"compile_report": str(out)}, variants=variants)


def _batch(sample, batch_size: int, device: torch.device) -> tuple:
    history, lengths = sample.history[:batch_size].to(device), sample.lengths[:batch_size].to(device)
    ts = None if sample.timestamps is None else sample.timestamps[:batch_size].to(device)
    return history, lengths, ts


def _record(metrics: dict[str, float], name: str, seconds: float, agreement: dict[str, float]) -> dict[str, float]:
    """Metric names carry the variant: compile_seconds_inductor-fp16, parity_topk_overlap_aoti-fp16, ..."""
    facts = {"compile_seconds": seconds, **agreement}
    metrics.update({f"{key}_{name}": value for key, value in facts.items()})
    log.info("%s: compiled in %.1f s; top-K overlap %.4f, max abs err %.2g", name, seconds,
             agreement["parity_topk_overlap"], agreement["parity_max_abs_err"])
    return facts


def _fresh_process_overlap(package, batch: tuple, timestamps: bool, ctx: Context) -> float:
    args = batch if timestamps else batch[:2]
    with torch.no_grad():
        here = AotiRetriever(package, ctx.device, timestamps)(*args)
    there = run_in_fresh_process(package, args, ctx.run_dir / "aoti")
    return parity(there[0], there[1], here[0].cpu(), here[1].float().cpu())["parity_topk_overlap"]
