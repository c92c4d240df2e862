"""validate: every variant on the same test split and the same inputs: quality from its top-K answer,
parity with the fp32 eager reference, latency over a batch-size sweep. One nested MLflow run per
variant (identical metric names, so the UI compares them), a comparison table and a plot."""
from __future__ import annotations

import csv
import logging

from pipeline.bench.latency import latency_metrics, latency_sweep
from pipeline.bench.plots import latency_vs_batch
from pipeline.core import Context, PipelineError, StageResult
from pipeline.data import load_splits
from pipeline.evaluation import parity, predict_top_k, top_k_metrics
from pipeline.tracking import device_name
from pipeline.variants import load_variant

log = logging.getLogger(__name__)

REFERENCE = "eager-fp32"
TABLE_COLUMNS = ("variant", "backend", "precision", "hr10", "ndcg10", "hr50", "ndcg50",
                 "parity_topk_overlap", "parity_max_abs_err", "latency_p50_ms_b1", "latency_p99_ms_b1")


def run(ctx: Context) -> StageResult:
    vcfg, device = ctx.cfg.validate, ctx.device
    variants = ctx.manifest.variants()
    names = [v.name for v in variants]
    if REFERENCE not in names:
        raise PipelineError(f"validate needs the {REFERENCE} reference from stage=train; variants found: {names or 'none'}")
    variants.sort(key=lambda v: v.name != REFERENCE)  # the reference first: the others compare with it
    test = load_splits(ctx.cfg).test

    reference, rows, latency_rows = None, [], []
    for variant in variants:
        with ctx.tracker.run(f"variant:{variant.name}", tags={
            "variant": variant.name, "backend": variant.backend, "precision": variant.precision, "stage": "validate",
        }):
            predict = load_variant(variant, device, vcfg.top_k)
            ids, scores = predict_top_k(predict, test, vcfg.eval_batch_size, device, desc=f"eval {variant.name}")
            if reference is None:
                reference = (ids, scores)
            metrics = top_k_metrics(ids, test.target, ks=(10, 50, 200))
            metrics.update(parity(ids, scores, *reference))
            metrics["hr10_delta"] = metrics["hr10"] - rows[0]["hr10"] if rows else 0.0
            sweep = latency_sweep(predict, test, vcfg.batch_sizes, device, vcfg.warmup, vcfg.iters, vcfg.num_threads)
            metrics.update(latency_metrics(sweep))
            ctx.tracker.log_metrics(metrics)
            ctx.tracker.set_tags({"status": "ok", "device_name": device_name(device)})
        rows.append({"variant": variant.name, "backend": variant.backend, "precision": variant.precision, **metrics})
        latency_rows += [{"variant": variant.name, **r} for r in sweep]
        log.info("%s: hr10=%.4f overlap=%.4f p50(b=1)=%.3f ms", variant.name, metrics["hr10"],
                 metrics["parity_topk_overlap"], metrics.get("latency_p50_ms_b1", float("nan")))

    table_csv = ctx.run_dir / "validate_variants.csv"
    _write_csv(table_csv, rows, TABLE_COLUMNS)
    latency_csv = ctx.run_dir / "validate_latency.csv"
    _write_csv(latency_csv, latency_rows, ("variant", "batch_size", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "users_per_s"))
    table_md = ctx.run_dir / "validate_variants.md"
    table_md.write_text(_markdown(rows, TABLE_COLUMNS))
    plot = latency_vs_batch(latency_rows, ctx.run_dir / "latency_vs_batch.png", f"latency on {device_name(device)}")
    return StageResult(
        metrics={"num_variants": len(rows)},
        artifacts={"validate_table": str(table_csv), "validate_table_md": str(table_md),
                   "validate_latency": str(latency_csv), "latency_plot": str(plot)},
    )


def _write_csv(path, rows, columns) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _markdown(rows, columns) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
