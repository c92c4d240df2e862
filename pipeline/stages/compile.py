"""compile: torch.compile variants of the retriever (catalogue specs listed in conf/compile) and an
AOTInductor package (.pt2) that a fresh process loads without the model's Python code. Each variant is
compiled, timed (compile seconds) and checked against fp32 eager on a few test users; one that fails to
build or falls below the gate is recorded as failed (with the reason) and left out, and the others go on to
validate, which measures every variant like the others. Inductor's
caches (FX graph, AOT autograd; TORCHINDUCTOR_CACHE_DIR) keep what is compiled here, so validate's load of
the same spec finds it."""
from __future__ import annotations

import json
import logging

import torch

from pipeline import kernels
from pipeline.bench.parity import check_parity, load_reference
from pipeline.catalogue import VariantSpec, build
from pipeline.core import Context, PipelineError, StageResult, Variant, build_variant
from pipeline.evaluation import parity
from pipeline.gates import gate_for
from pipeline.export import ShapeRange
from pipeline.export.inductor import (
    AotiRetriever,
    inductor_cache_dir,
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
    precision = target_precision(ctx.cfg.precision)
    specs = inductor_specs(ccfg.inductor[device.type], ccfg.kernels, precision)
    batch_size = ctx.cfg.gates.sample.batch_size
    sample, reference = load_reference(ctx.cfg, ctx.require_artifact("reference_answer"), checkpoint, ccfg.top_k)
    first_batch = _batch(sample, batch_size, device)

    metrics: dict[str, float] = {}
    variants, facts, skipped, failures = [], {}, {}, {}
    for spec in specs:
        if spec.kernels == "triton" and not kernels.triton_runs_on(device):
            skipped[spec.name] = "Triton kernels need a CUDA device"
            log.warning("%s skipped: %s", spec.name, skipped[spec.name])
            continue

        def inductor_variant() -> Variant:
            variant, facts[spec.name] = build_inductor(ctx, spec, checkpoint, sample, reference, first_batch, metrics)
            return variant

        variants.append(build_variant(ctx, spec.name, failures, inductor_variant))

    def aoti_variant() -> Variant:
        spec = VariantSpec("aoti", precision)
        retriever = build_retriever(checkpoint, ccfg.top_k, precision, device)
        width = sample.history.shape[1]
        package, seconds, cxx = package_aoti(
            retriever, ctx.run_dir / "aoti" / f"retriever-{precision}.pt2",
            ShapeRange(**ccfg.aoti.batch).check("compile.aoti.batch"), ShapeRange(1, width, width), device,
        )
        ctx.tracker.set_tags({f"{spec.name}_cxx": cxx})
        timestamps = uses_timestamps(retriever)
        agreement = check_parity(spec.name, AotiRetriever(package, device, timestamps), reference, sample,
                                 gate_for(ctx.cfg.gates, precision), batch_size, device)
        agreement["fresh_process_topk_overlap"] = _fresh_process_overlap(package, first_batch, timestamps, ctx)
        if agreement["fresh_process_topk_overlap"] < 1.0:
            raise PipelineError(f"{spec.name}: reloaded in a fresh process it answers differently "
                                f"(top-K overlap {agreement['fresh_process_topk_overlap']:.4f} with this process)")
        facts[spec.name] = {"path": str(package), "cxx": cxx, **_record(metrics, spec.name, seconds, agreement)}
        return spec.variant(str(package), "compile", top_k=ccfg.top_k, uses_timestamps=timestamps, cxx=cxx)

    if device.type in ccfg.aoti.devices:
        variants.append(build_variant(ctx, VariantSpec("aoti", precision).name, failures, aoti_variant))

    variants = [v for v in variants if v is not None]
    if skipped:
        ctx.tracker.set_tags({"skipped_variants": "; ".join(f"{n}: {why}" for n, why in skipped.items())[:5000]})
    out = ctx.run_dir / "compile.json"
    out.write_text(json.dumps({"variants": facts, "skipped": skipped, "failed": failures,
                               "inductor_cache_dir": inductor_cache_dir()}, indent=2))
    metrics["num_variants"] = len(variants)
    return StageResult(metrics=metrics, artifacts={"compile_report": str(out)}, variants=variants, failures=failures)


def target_precision(precision: str) -> str:
    """The compile stage's precision: the target, or fp32 when it is int8 (INT8 variants are the int8 stage's)."""
    return precision if precision in ("fp16", "bf16") else "fp32"


def inductor_specs(entries, kernels_default: str, precision: str) -> list[VariantSpec]:
    """compile.inductor.<device>: names, or mappings of spec fields (kernels: compile.kernels, precision: the
    target precision, unless the entry says)."""
    specs = []
    for entry in entries:
        if not isinstance(entry, str):
            entry = {"kernels": kernels_default, **entry}
        spec = VariantSpec.from_entry(entry, backend="inductor", precision=precision)
        if spec.precision not in ("fp32", "fp16", "bf16"):
            raise PipelineError(f"compile.inductor entry {entry}: precision must be fp32, fp16 or bf16")
        specs.append(spec)
    names = [s.name for s in specs]
    doubles = sorted({n for n in names if names.count(n) > 1})
    if doubles:
        raise PipelineError(f"compile.inductor lists {', '.join(doubles)} more than once")
    return specs


def build_inductor(ctx: Context, spec: VariantSpec, checkpoint: str, sample, reference, first_batch: tuple,
                   metrics: dict[str, float]) -> tuple[Variant, dict[str, float]]:
    """One torch.compile variant: built by the catalogue, compiled for the shapes validate and serving call
    (batch 1, and every larger batch in one dynamic graph) so that a later load finds Inductor's cache
    warm, and checked against fp32 eager. -> (its manifest record, its facts)."""
    ccfg, device = ctx.cfg.compile, ctx.device
    torch._dynamo.reset()  # the previous variant's guards off Retriever's code (Dynamo's recompile limit)
    predict = build(spec, build_retriever(checkpoint, ccfg.top_k, spec.precision, device), device)
    seconds = timed_first_call(predict, first_batch) + timed_first_call(predict, tuple(
        None if t is None else t[:1] for t in first_batch))
    agreement = check_parity(spec.name, predict, reference, sample, gate_for(ctx.cfg.gates, spec.precision),
                             ctx.cfg.gates.sample.batch_size, device)
    return spec.variant(checkpoint, "compile", top_k=ccfg.top_k), _record(metrics, spec.name, seconds, agreement)


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
