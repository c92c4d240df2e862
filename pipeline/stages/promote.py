"""promote: the best variant that passes its gate (conf/gates, checked on validate's metrics) becomes the champion.

The policy picks it (lowest p99 at a batch size, or highest throughput under a latency budget). Its files,
the item vocabulary and a few test histories are registered as a new version of the MLflow model, with
the variant, key metrics and the host's fingerprint as version tags; alias `champion` moves to it and the
former champion becomes `previous`. Files whose digest (pipeline.integrity) does not check are refused; files
already registered (same variant digest, tag `digest`, in any version) are not registered again: the aliases
move to that version. When no variant passes, promote refuses: nothing else is promoted.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf

from pipeline.core import Context, PipelineError, StageResult, Variant
from pipeline.data import leave_one_out, load_interactions
from pipeline.data.vocabulary import raw_item_ids as vocabulary_item_ids, read_vocabulary
from pipeline.gates import check, gate_for
from pipeline.integrity import verify_digest
from pipeline.serving.package import variant_digest, write_package
from pipeline.tracking import CHAMPION, host_tags

log = logging.getLogger(__name__)

Result = dict  # one variant of validate_variants.json: {"variant", "metrics", "gate_passed", "gate_reason"}
FINGERPRINT_KEYS = ("device_name", "cuda", "tensorrt_version", "onnxruntime_version", "torch_version")


def run(ctx: Context) -> StageResult:
    pcfg = ctx.cfg.promote
    if pcfg.policy not in POLICIES:
        raise PipelineError(f"unknown promote.policy '{pcfg.policy}'; valid choices: {', '.join(POLICIES)}")
    results = _validate_results(ctx)
    if pcfg.backends:
        results = [r for r in results if r["variant"]["backend"] in pcfg.backends]
        if not results:
            raise PipelineError(f"no variant has a backend in promote.backends={list(pcfg.backends)}")
    verdicts = [_verdict(ctx, r) for r in results]
    passing = [r for r, (passed, _) in zip(results, verdicts) if passed]
    if not passing:
        reasons = "; ".join(f"{r['variant']['name']}: {why}" for r, (_, why) in zip(results, verdicts))
        raise PipelineError(f"no variant passed its gates, nothing to promote ({reasons}); "
                            "fix the variants or loosen gates.<precision>.*")
    chosen, why = POLICIES[pcfg.policy](passing, pcfg)
    variant = Variant(**chosen["variant"])
    log.info("champion candidate %s: %s", variant.name, why)

    verify_digest(variant.artifact)
    digest = variant_digest(variant)
    current = ctx.tracker.model_version(pcfg.model_name, CHAMPION)
    if current is not None and current.tags.get("digest") == digest:
        log.info("%s is already the champion (version %s); nothing registered", variant.name, current.version)
        ctx.tracker.set_tags({"champion_version": current.version, "variant": variant.name})
        return StageResult(metrics={"champion_version": int(current.version)})
    same = ctx.tracker.find_model_version(pcfg.model_name, "digest", digest)
    if same is not None:
        former = ctx.tracker.make_champion(pcfg.model_name, same.version)
        log.info("%s is already registered as version %s (same digest %s); nothing registered, %s -> version %s%s",
                 variant.name, same.version, digest, CHAMPION, same.version,
                 f"; version {former} is now previous" if former else "")
        ctx.tracker.set_tags({"champion_version": same.version, "variant": variant.name, "policy_reason": why})
        return StageResult(metrics={"champion_version": int(same.version)})

    fingerprint = {k: v for k, v in host_tags(ctx.device).items() if k in FINGERPRINT_KEYS}
    metrics = _key_metrics(chosen["metrics"])
    package = _build_package(ctx, variant, metrics, fingerprint, why)
    verify_digest(package.variant.artifact)  # the copy that is registered, as deploy will check it
    tags = {"variant": variant.name, "backend": variant.backend, "precision": variant.precision,
            "policy": pcfg.policy, "policy_reason": why, "digest": digest, "source_run": ctx.tracker.parent_run_id,
            "model": ctx.cfg.model.name, "data": ctx.cfg.data.name, **metrics, **fingerprint,
            "fingerprint": " | ".join(f"{k}={v}" for k, v in fingerprint.items())}
    version = ctx.tracker.register_model(pcfg.model_name, package.root, f"{pcfg.model_name}-{variant.name}", tags)
    former = ctx.tracker.make_champion(pcfg.model_name, version.version)
    log.info("registered %s version %s (%s) as %s%s", pcfg.model_name, version.version, variant.name, CHAMPION,
             f"; version {former} is now previous" if former else "")
    ctx.tracker.set_tags({"champion_version": version.version, "variant": variant.name, "policy_reason": why})
    summary = ctx.run_dir / "champion.json"
    summary.write_text(json.dumps({"model": pcfg.model_name, "version": str(version.version), "previous": former,
                                   "variant": variant.to_dict(), "why": why, "tags": tags}, indent=2))
    return StageResult(metrics={"champion_version": int(version.version)}, artifacts={"champion": str(summary)})


def lowest_p99(passing: list[Result], pcfg) -> tuple[Result, str]:
    key = f"latency_p99_ms_b{pcfg.batch_size}"
    missing = [r["variant"]["name"] for r in passing if key not in r["metrics"]]
    if missing:
        raise PipelineError(f"promote.batch_size={pcfg.batch_size} was not measured for {', '.join(missing)}; "
                            f"choose one of the measured batch sizes: {_batch_sizes(passing[0])}")
    best = min(passing, key=lambda r: r["metrics"][key])
    return best, f"lowest {key} ({best['metrics'][key]:.3f} ms) of {len(passing)} variants passing the gates"


def max_throughput(passing: list[Result], pcfg) -> tuple[Result, str]:
    budget = pcfg.latency_budget_ms
    offers = [(r["metrics"][f"users_per_s_b{b}"], b, r) for r in passing for b in _batch_sizes(r)
              if r["metrics"][f"latency_p99_ms_b{b}"] <= budget]
    if not offers:
        fastest = ", ".join(f"{r['variant']['name']} {min(r['metrics'][f'latency_p99_ms_b{b}'] for b in _batch_sizes(r)):.3f} ms"
                            for r in passing)
        raise PipelineError(f"no variant passing the gates keeps p99 under promote.latency_budget_ms={budget} "
                            f"at any batch size (best p99: {fastest}); raise the budget")
    users_per_s, batch, best = max(offers, key=lambda o: o[0])
    return best, f"highest throughput under p99 {budget} ms: {users_per_s:.0f} users/s at batch {batch}"


POLICIES: dict[str, Callable[[list[Result], object], tuple[Result, str]]] = {
    "lowest_p99": lowest_p99,
    "max_throughput": max_throughput,
}


def _verdict(ctx: Context, result: Result) -> tuple[bool, str]:
    """The variant's gate, as configured now, on validate's metrics -> (passed, why)."""
    if not result.get("metrics"):
        return False, result.get("gate_reason") or "not measured by validate"
    return check(result["metrics"], gate_for(ctx.cfg.gates, result["variant"]["precision"]))


def _batch_sizes(result: Result) -> list[int]:
    return sorted(int(m.group(1)) for k in result["metrics"] if (m := re.fullmatch(r"latency_p99_ms_b(\d+)", k)))


def _key_metrics(metrics: dict[str, float]) -> dict[str, float]:
    keep = ("hr10", "ndcg10", "hr10_delta", "parity_topk_overlap", "gate_passed")
    return {k: v for k, v in metrics.items() if k in keep or re.fullmatch(r"(latency_p99_ms|users_per_s)_b\d+", k)}


def _validate_results(ctx: Context) -> list[Result]:
    path = ctx.manifest.artifact("validate_results")
    if path is None or not Path(path).is_file():
        raise PipelineError("promote needs the gate results of stage=validate: run stage=[validate,promote], "
                            "or pass from_run=<parent run id> of a run that validated")
    return json.loads(Path(path).read_text())


def _build_package(ctx: Context, variant: Variant, metrics: dict, fingerprint: dict, why: str):
    """The variant's files with the item vocabulary and a few test histories (raw ids), as deploy needs them."""
    cfg = ctx.cfg
    interactions = load_interactions(cfg.data)
    test = leave_one_out(interactions, cfg.model.max_len).test
    count = min(cfg.promote.examples, len(test.lengths))
    raw = interactions.raw_item_ids
    vocabulary = ctx.manifest.artifact("vocabulary")  # the train stage's, checked against its digest
    if vocabulary is not None:
        raw = vocabulary_item_ids(read_vocabulary(vocabulary)["items"])
        if len(raw) != len(interactions.raw_item_ids) or list(raw[1:]) != list(interactions.raw_item_ids[1:]):
            raise PipelineError(f"the data ({cfg.data.get('path') or cfg.data.name}) no longer gives the vocabulary "
                                f"the model was trained with ({vocabulary}); train again, or restore the file")
    examples = [raw[test.history[u, : test.lengths[u]].numpy()].tolist() for u in range(count)]
    times = None
    if cfg.model.get("time_bias") and test.timestamps is not None:  # what a time-bias model's requests carry
        times = [test.timestamps[u, : test.lengths[u]].tolist() for u in range(count)]
    return write_package(
        ctx.run_dir / "champion", variant,
        model_config=OmegaConf.to_container(cfg.model, resolve=True), top_k=cfg.validate.top_k, raw_item_ids=raw, examples=examples,
        info={"metrics": metrics, "fingerprint": fingerprint, "why": why, "source_run": ctx.tracker.parent_run_id,
              "data": cfg.data.name},
        example_timestamps=times,
    )
