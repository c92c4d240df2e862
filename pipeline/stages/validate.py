"""validate: every variant on the same test split and the same inputs: quality from its top-K answer,
parity with the fp32 eager reference, latency over a batch-size sweep. One nested MLflow run per
variant (identical metric names, so the UI compares them), each variant's gate result (pipeline.gates), a
comparison table (with the variants of earlier runs of the same config) and plots, also logged to the
parent run. The reference itself must score the test HR@10 the train stage measured: a checkpoint that
changed since (corrupt, swapped) would otherwise be its own yardstick. A variant that an earlier stage
failed to build, or that fails to load or answer here, is a row of the table with gate_passed false and
the reason (and a FAILED variant run), so promote never takes it."""
from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import replace
from functools import partial
from typing import Callable

import torch

from pipeline.bench.latency import latency_metrics, latency_sweep, sample_inputs
from pipeline.bench.plots import latency_vs_batch, quality_vs_latency
from pipeline.core import Context, PipelineError, StageResult, Variant, build_variant
from pipeline.data import load_splits
from pipeline.evaluation import parity, predict_top_k, top_k_metrics
from pipeline.gates import REFERENCE, check, gate_for
from pipeline.tracking import device_name, lineage_key
from pipeline.variants import load_variant

log = logging.getLogger(__name__)

TABLE_COLUMNS = ("variant", "backend", "precision", "hr10", "ndcg10", "hr50", "ndcg50",
                 "parity_topk_overlap", "parity_max_abs_err", "latency_p50_ms_b1", "latency_p99_ms_b1",
                 "compile_seconds", "load_seconds", "gate_passed", "gate_reason")


def table_columns(batch_sizes) -> tuple[str, ...]:
    """TABLE_COLUMNS with the p50 of every other batch size of the sweep after batch 1's latencies."""
    at = TABLE_COLUMNS.index("latency_p99_ms_b1") + 1
    more = tuple(f"latency_p50_ms_b{b}" for b in batch_sizes if b != 1)
    return TABLE_COLUMNS[:at] + more + TABLE_COLUMNS[at:]
HISTORY_COLUMNS = ("run", "variant", "backend", "precision", "hr10", "parity_topk_overlap", "gate_passed",
                   "latency_p50_ms_b1", "latency_p99_ms_b1")


def run(ctx: Context) -> StageResult:
    vcfg, device = ctx.cfg.validate, ctx.device
    variants = ctx.manifest.variants()
    names = [v.name for v in variants]
    if REFERENCE not in names:
        raise PipelineError(f"validate needs the {REFERENCE} reference from stage=train; variants found: {names or 'none'}")
    variants.sort(key=lambda v: v.name != REFERENCE)  # the reference first: the others compare with it
    test = load_splits(ctx.cfg).test
    key, parent = lineage_key(ctx.cfg), ctx.tracker.parent_run_id

    reference, rows, latency_rows, results, failures = None, [], [], [], {}
    for variant in variants:
        tags = {"variant": variant.name, "backend": variant.backend, "precision": variant.precision,
                "stage": "validate", "lineage_key": key, "pipeline_run": parent}
        measure = partial(_measure, variant, ctx, test, reference)
        # Every variant is measured against the reference: without it nothing can be, and the stage fails.
        measured = measure() if reference is None else build_variant(ctx, variant.name, failures, measure, tags)
        if measured is None:
            continue
        metrics, sweep, answer = measured
        if reference is None:
            reference = answer
            check_reference(metrics["hr10"], ctx.manifest.stages.get("train", {}).get("metrics", {}),
                            len(test.target), ctx.cfg.gates.reference_hr10_tolerance, variant.artifact)
        metrics["hr10_delta"] = metrics["hr10"] - rows[0]["hr10"] if rows else 0.0
        compiled = ctx.manifest.metric(f"compile_seconds_{variant.name}")
        if compiled is not None:
            metrics["compile_seconds"] = compiled
        gate = gate_for(ctx.cfg.gates, variant.precision)
        passed, why = check(metrics, gate)
        returning_ok = _returning_check(variant.name, metrics, gate)
        metrics.update(gate.as_metrics())
        metrics["gate_passed"] = float(passed)
        with ctx.tracker.run(f"variant:{variant.name}", tags=tags):
            ctx.tracker.log_metrics(metrics)
            ctx.tracker.set_tags({"status": "ok", "device_name": device_name(device),
                                  "gate_passed": str(passed).lower(), "gate_reason": why})
        rows.append({"variant": variant.name, "backend": variant.backend, "precision": variant.precision,
                     **metrics, "gate_reason": why, "returning_ok": returning_ok})
        results.append({"variant": variant.to_dict(), "metrics": metrics, "gate_passed": passed, "gate_reason": why})
        latency_rows += [{"variant": variant.name, **r} for r in sweep]
        log.info("%s: hr10=%.4f overlap=%.4f p50(b=1)=%.3f ms", variant.name, metrics["hr10"],
                 metrics["parity_topk_overlap"], metrics.get("latency_p50_ms_b1", float("nan")))
    measured_rows = list(rows)
    failed = _failed_variants(ctx, failures, {v.name for v in variants} - set(failures))
    rows += [{"variant": name, "backend": "", "precision": "", "gate_passed": 0.0, "gate_reason": why}
             for name, why in failed.items()]
    results += [{"variant": {"name": name, "backend": "", "precision": ""}, "metrics": {}, "gate_passed": False,
                 "gate_reason": why, "failed": True} for name, why in failed.items()]

    table_csv, columns = ctx.run_dir / "validate_variants.csv", table_columns(vcfg.batch_sizes)
    _write_csv(table_csv, rows, columns)
    latency_csv = ctx.run_dir / "validate_latency.csv"
    _write_csv(latency_csv, latency_rows, ("variant", "batch_size", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "users_per_s"))
    table_md = ctx.run_dir / "validate_variants.md"
    twins = against_twins(variants, measured_rows, vcfg.batch_sizes)
    table_md.write_text(_markdown(rows, columns) + _twins_markdown(twins, vcfg.batch_sizes)
                        + _returning_markdown(measured_rows))
    plot = latency_vs_batch(latency_rows, ctx.run_dir / "latency_vs_batch.png", f"latency on {device_name(device)}")
    results_json = ctx.run_dir / "validate_variants.json"
    results_json.write_text(json.dumps(results, indent=2))

    earlier = ctx.tracker.earlier_variant_runs(key, parent, vcfg.earlier_runs)
    history = [{"run": "this run", **r} for r in rows] + [{**r, "run": str(r["run"])[:8]} for r in earlier]
    history_csv, history_md = ctx.run_dir / "validate_history.csv", ctx.run_dir / "validate_history.md"
    _write_csv(history_csv, history, HISTORY_COLUMNS)
    history_md.write_text(_markdown(history, HISTORY_COLUMNS))
    latency_key = f"latency_p99_ms_b{min(vcfg.batch_sizes)}"
    quality_plot = quality_vs_latency(measured_rows, earlier, ctx.run_dir / "quality_vs_latency.png",
                                      f"quality against latency on {device_name(device)}", latency_key)
    for path in (table_csv, table_md, history_csv, history_md, plot, quality_plot):
        ctx.tracker.log_artifact(path, run_id=parent)
    log.info("gates: %s", ", ".join(f"{r['variant']['name']}={'pass' if r['gate_passed'] else 'FAIL'}" for r in results))
    return StageResult(
        metrics={"num_variants": len(measured_rows), "num_passing_gates": sum(r["gate_passed"] for r in results),
                 "num_failed_variants": len(failed),
                 "num_slower_than_twin": sum(any(r < TWIN_TOLERANCE for r in t["ratios"].values()) for t in twins),
                 "num_returning_outside_gate": sum(r.get("returning_ok") is False for r in measured_rows)},
        artifacts={"validate_table": str(table_csv), "validate_table_md": str(table_md),
                   "validate_latency": str(latency_csv), "latency_plot": str(plot),
                   "validate_results": str(results_json), "validate_history": str(history_csv),
                   "validate_history_md": str(history_md), "quality_plot": str(quality_plot)},
        failures=failures,
    )


def _measure(variant: Variant, ctx: Context, test, reference: tuple | None) -> tuple[dict[str, float], list[dict], tuple]:
    """-> (quality, parity with `reference` (None: itself), latency and load seconds; the latency sweep; its
    top-K answer)."""
    vcfg, device = ctx.cfg.validate, ctx.device
    torch._dynamo.reset()  # the previous variant's guards off Retriever's code (Dynamo's recompile limit)
    predict, load_seconds = _load(variant, device, vcfg.top_k, test, vcfg.eval_batch_size)
    ids, scores = predict_top_k(predict, test, vcfg.eval_batch_size, device, desc=f"eval {variant.name}")
    metrics = top_k_metrics(ids, test.target, ks=(10, 50, 200))
    metrics.update(parity(ids, scores, *(reference or (ids, scores))))
    if ctx.cfg.serving.cache.enabled:
        metrics.update(returning_parity(predict, test, ids, scores, ctx.cfg.gates.sample.num_users,
                                        vcfg.eval_batch_size, device, int(ctx.cfg.serving.cache.page_size)))
    sweep = latency_sweep(predict, test, vcfg.batch_sizes, device, vcfg.warmup, vcfg.iters, vcfg.num_threads)
    metrics.update(latency_metrics(sweep))
    metrics["load_seconds"] = load_seconds
    return metrics, sweep, (ids, scores)


@torch.no_grad()
def returning_parity(predict: Callable, split, ids: torch.Tensor, scores: torch.Tensor, num_users: int, batch_size: int,
                     device: torch.device, page_size: int) -> dict[str, float]:
    """What the serving engine answers a returning user against the variant's own answer (ids, scores: its
    top-K on `split`): for the first num_users users with two actions or more, the history without its last
    action seeds a user-state cache (docs/INCREMENTAL.md: the engine's KVCache and IncrementalRetriever over
    the variant's eager modules and kernel choice), then the whole history is answered from the cached state,
    as a request with USER_ID is. -> returning_topk_overlap, returning_max_abs_err (parity with the variant's
    answer, for the variant's gate) and returning_hit_share (the share of those answers that came from the
    cache); {} where the engine serves every row with the variant's own call (an exported artifact, SASRec)."""
    from pipeline.catalogue import eager_form
    from pipeline.serving.kvcache import IncrementalRetriever, KVCache

    form = eager_form(predict)
    if form is None:
        return {}
    retriever, kernel_choice = form
    probe = IncrementalRetriever(retriever, None)
    users = torch.nonzero(split.lengths[:num_users] >= 2).flatten()
    if probe.reason or not len(users):
        return {}
    rows, width = min(batch_size, len(users)), split.history.shape[1]
    page_size = max(1, min(page_size, width))
    # Room for one batch's users on the device tier, whole pages each (and a page more for the query).
    budget = 2 * rows * probe.bytes_per_user(width + 2 * page_size)
    cache = KVCache(budget, 0, device, page_size=page_size)
    engine = IncrementalRetriever(retriever, cache, namespace="validate", cuda_graphs=False)
    got_ids, got_scores = [], []
    with torch.inference_mode(), kernel_choice():
        for start in range(0, len(users), rows):
            batch = users[start: start + rows]
            history, lengths = split.history[batch], split.lengths[batch]
            times = None if split.timestamps is None else split.timestamps[batch]
            who = batch.tolist()
            engine.recommend(history, lengths - 1, who, times)  # the earlier visit: a miss that seeds the cache
            batch_ids, batch_scores = engine.recommend(history, lengths, who, times)  # one action more
            got_ids.append(batch_ids.cpu())
            got_scores.append(batch_scores.float().cpu())
            cache.clear()
    agreement = parity(torch.cat(got_ids), torch.cat(got_scores), ids[users], scores[users])
    return {"returning_topk_overlap": agreement["parity_topk_overlap"],
            "returning_max_abs_err": agreement["parity_max_abs_err"],
            "returning_hit_share": cache.counters["hits_device"] / len(users)}


# Our kernels' variant may be at most this much slower than its twin (twin p50 / ours p50 below it: flagged).
TWIN_TOLERANCE = 0.95


def against_twins(variants: list[Variant], rows: list[dict], batch_sizes) -> list[dict]:
    """Each measured variant with our kernels beside its twin, the same spec with the reference kernels, where
    both were measured: {"variant", "twin", "ratios": {batch: twin p50 / ours p50}} (>= 1: ours not slower). A
    ratio below TWIN_TOLERANCE is logged as a warning: the whole-call dispatch should have served the twin."""
    measured = {r["variant"]: r for r in rows}
    out = []
    for variant in variants:
        spec = variant.spec if variant.name in measured else None
        if spec is None or spec.kernels != "triton":
            continue
        twin = replace(spec, kernels="reference", reference_ops=()).name
        if twin not in measured:
            continue
        ratios = {}
        for b in batch_sizes:
            ours, theirs = measured[variant.name].get(f"latency_p50_ms_b{b}"), measured[twin].get(f"latency_p50_ms_b{b}")
            if ours and theirs:
                ratios[b] = theirs / ours
        slower = {b: r for b, r in ratios.items() if r < TWIN_TOLERANCE}
        if slower:
            log.warning("%s is slower than its twin %s at batch %s (twin p50 / ours: %s): its whole-call dispatch "
                        "served ours there", variant.name, twin, ", ".join(map(str, slower)),
                        ", ".join(f"{r:.2f}" for r in slower.values()))
        out.append({"variant": variant.name, "twin": twin, "ratios": ratios})
    return out


def _twins_markdown(twins: list[dict], batch_sizes) -> str:
    if not twins:
        return ""
    lines = ["", "Our kernels against their twin (the same spec with the reference kernels): twin p50 / ours p50 "
             f"(>= 1: ours not slower; below {TWIN_TOLERANCE}: flagged)", "",
             "| variant | twin | " + " | ".join(f"b{b}" for b in batch_sizes) + " |",
             "|" + " --- |" * (2 + len(batch_sizes))]
    for t in twins:
        cells = [f"{t['ratios'][b]:.2f}{' (slower)' if t['ratios'][b] < TWIN_TOLERANCE else ''}"
                 if b in t["ratios"] else "" for b in batch_sizes]
        lines.append(f"| {t['variant']} | {t['twin']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _returning_check(name: str, metrics: dict, gate) -> bool | None:
    """Is the returning users' answer (returning_parity) within the variant's gate of parity with the variant's
    own answer? None when it was not measured. Outside it: a warning (serving.cache.enabled=false serves such a
    variant without the cache)."""
    if "returning_topk_overlap" not in metrics:
        return None
    overlap, err = metrics["returning_topk_overlap"], metrics["returning_max_abs_err"]
    ok = (gate.min_topk_overlap is None or overlap >= gate.min_topk_overlap) and \
        (gate.max_score_err is None or err <= gate.max_score_err)
    log.log(logging.INFO if ok else logging.WARNING,
            "%s: returning users (cached state) against its own answer: top-K overlap %.4f, max score error %.3g, "
            "%.0f%% answered from the cache%s", name, overlap, err, 100 * metrics["returning_hit_share"],
            "" if ok else "; OUTSIDE its gate: the served answers of returning users differ from the variant's")
    return ok


def _returning_markdown(rows: list[dict]) -> str:
    measured = [r for r in rows if "returning_topk_overlap" in r]
    if not measured:
        return ""
    lines = ["", "Returning users as the serving engine answers them (the history without its last action cached, "
             "then the whole history from that state) against the variant's own answer, on the gate's sample", "",
             "| variant | top-K overlap | max score error | from the cache | within the gate |", "| --- | --- | --- | --- | --- |"]
    for r in measured:
        lines.append(f"| {r['variant']} | {r['returning_topk_overlap']:.4f} | {r['returning_max_abs_err']:.3g} | "
                     f"{r['returning_hit_share']:.0%} | {'yes' if r['returning_ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def _failed_variants(ctx: Context, failed_here: dict[str, str], measured: set[str]) -> dict[str, str]:
    """Every variant that could not be built (earlier stages) or measured (here): name -> why, for the table."""
    failed = {name: f"failed in {stage}: {why}" for stage, entry in ctx.manifest.stages.items()
              for name, why in entry.get("failures", {}).items() if name not in measured}
    failed.update({name: f"failed in validate: {why}" for name, why in failed_here.items()})
    return failed


def _load(variant, device, top_k: int, test, batch_size: int) -> tuple[Callable, float]:
    """-> (the variant's call, seconds to load it and answer its first batch of each shape validate uses:
    the eval batch and batch 1; for a torch.compile variant that is compiling, or reading Inductor's cache
    that the compile stage filled)."""
    start = time.perf_counter()
    predict = load_variant(variant, device, top_k)
    for size in (min(batch_size, test.target.shape[0]), 1):
        history, lengths, ts = sample_inputs(test, size, device)
        predict(history, lengths, ts)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return predict, time.perf_counter() - start


def check_reference(hr10: float, train_metrics: dict, num_users: int, tolerance: float, checkpoint: str) -> None:
    """Refuses to go on when eager-fp32's test HR@10 is more than `tolerance` (or one user) away from the
    figure the train stage measured for the same checkpoint."""
    trained = train_metrics.get("hr10")
    if trained is None:
        log.warning("the train stage's test HR@10 is not in the manifest: %s is not checked against it", REFERENCE)
        return
    allowed = max(tolerance, 1.0 / num_users)
    if abs(hr10 - trained) > allowed + 1e-9:
        raise PipelineError(
            f"{REFERENCE} ({checkpoint}) scores test HR@10 {hr10:.4f}, but the train stage measured {trained:.4f} "
            f"for it, more than gates.reference_hr10_tolerance={tolerance} apart: the checkpoint changed since it was "
            "trained (corrupt?), or the data did. Nothing is validated or promoted; run stage=train again")


def _write_csv(path, rows, columns) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _markdown(rows, columns) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")  # a reason may hold a |

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
