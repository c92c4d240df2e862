"""Resolves `stage`, runs the stages in order, and owns the parent MLflow run."""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.core import (
    DEVICES,
    PRECISIONS,
    STAGE_ORDER,
    Context,
    Manifest,
    PipelineError,
    StageResult,
    StageUnavailable,
)
from pipeline.checkpoint import read_checkpoint
from pipeline.data import DataError, DatasetNotFoundError
from pipeline.gates import gate_for
from pipeline.stages import STAGES
from pipeline.tracking import MANIFEST_FILE, Tracker, flatten, host_tags, lineage_key

log = logging.getLogger(__name__)

# stage=all stops before deploy: deploying is asked for by name (make deploy).
_ALL_UNTIL = "promote"


def resolve_stages(stage: str | list[str] | ListConfig) -> tuple[list[str], bool]:
    """-> (stages in pipeline order, whether they were asked for by name)."""
    if isinstance(stage, str) and stage == "all":
        last = STAGE_ORDER.index(_ALL_UNTIL)
        return [s for s in STAGE_ORDER[: last + 1] if s in STAGES], False
    names = [stage] if isinstance(stage, str) else list(stage)
    if not names:
        raise PipelineError(f"stage is empty; valid choices: all, {', '.join(STAGE_ORDER)}")
    for name in names:
        if name not in STAGE_ORDER:
            raise PipelineError(f"unknown stage '{name}'; valid choices: all, {', '.join(STAGE_ORDER)}")
        if name not in STAGES:
            raise PipelineError(
                f"stage '{name}' is not built yet; available now: {', '.join(s for s in STAGE_ORDER if s in STAGES)}"
            )
    return sorted(set(names), key=STAGE_ORDER.index), True


def check_config(cfg: DictConfig) -> None:
    if cfg.precision not in PRECISIONS:
        raise PipelineError(f"unknown precision '{cfg.precision}'; valid choices: {', '.join(PRECISIONS)}")
    if cfg.device not in DEVICES:
        raise PipelineError(f"unknown device '{cfg.device}'; valid choices: {', '.join(DEVICES)}")
    if not isinstance(cfg.seed, int):
        raise PipelineError(f"seed must be an integer, got {cfg.seed!r}")
    if not isinstance(cfg.strict, bool):
        raise PipelineError(f"strict must be true or false, got {cfg.strict!r}")
    for precision in PRECISIONS:
        gate_for(cfg.gates, precision)  # a gate with an unknown part is refused before anything runs


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("device=cuda but CUDA is not available here; use device=auto or device=cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_pipeline(cfg: DictConfig) -> int:
    """Runs the configured stages; returns the process exit code."""
    check_config(cfg)
    stages, by_name = resolve_stages(cfg.stage)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)

    artifacts_dir = Path(cfg.artifacts_dir)
    tracker = Tracker(cfg.mlflow, artifacts_dir)
    key = lineage_key(cfg)
    tags = {"lineage_key": key, "stages": ",".join(stages), "precision": cfg.precision, **host_tags(device)}
    with tracker.run(cfg.run_name or f"pipeline[{','.join(stages)}]", tags=tags, nested=False) as parent:
        run_dir = artifacts_dir / "runs" / parent.info.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        tracker.log_params(flatten(cfg))
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        manifest = _starting_manifest(cfg, stages, tracker, key)
        ctx = Context(cfg=cfg, device=device, run_dir=run_dir, manifest=manifest, tracker=tracker)
        log.info("run %s: stages %s on %s; artifacts in %s", parent.info.run_id, stages, device, run_dir)

        exit_code, failed = 0, {}
        for name in stages:
            result = _run_stage(name, ctx, by_name)
            failed.update(result.failures)
            manifest.record(name, result)
            manifest.save(run_dir / MANIFEST_FILE)
            tracker.log_artifact(run_dir / MANIFEST_FILE)
            if "checkpoint" in result.artifacts:
                tracker.set_tags({"has_checkpoint": "true"})
            if result.status == "failed":
                exit_code = StageUnavailable.exit_code if by_name else 1
                log.error("stage %s failed: %s", name, result.reason)
                break
        if failed:
            tracker.set_tags({"failed_variants": _listing(failed)})
            exit_code = exit_code or _report_failed_variants(failed, bool(cfg.strict))
        tracker.set_tags({"status": "ok" if exit_code == 0 else "failed"})
    if exit_code:
        # The parent run is closed as FINISHED by MLflow's context manager; mark it failed for the UI.
        tracker.client.set_terminated(parent.info.run_id, status="FAILED")
    return exit_code


def _listing(failed: dict[str, str]) -> str:
    """name: reason; ... as an MLflow tag holds it."""
    return "; ".join(f"{name}: {why}" for name, why in failed.items())[:5000]


def _report_failed_variants(failed: dict[str, str], strict: bool) -> int:
    """The variants this invocation could not build or load, once at the end. -> the exit code they ask for:
    1 with strict=true, else 0 (the run went on without them)."""
    report = log.error if strict else log.warning
    report("%d variant(s) failed and were left out%s: %s", len(failed),
           " (strict=true: exit 1)" if strict else " (strict=true makes this exit 1)", _listing(failed))
    return 1 if strict else 0


def _starting_manifest(cfg: DictConfig, stages: list[str], tracker: Tracker, key: str) -> Manifest:
    """A run without train picks up the checkpoint of an earlier run (from_run, else the latest match)."""
    if "train" in stages and cfg.from_run is None:
        return Manifest()
    try:
        found = tracker.find_manifest(key, run_id=cfg.from_run)
    except FileNotFoundError as err:
        raise PipelineError(str(err)) from err
    if found is None:
        log.warning("no earlier run with this data+model config; later stages need stage=train first")
        return Manifest()
    run_id, manifest = found
    checkpoint = manifest.artifact("checkpoint")
    if checkpoint is not None:
        saved = read_checkpoint(checkpoint)["model_config"]
        wanted = OmegaConf.to_container(cfg.model, resolve=True)
        if saved != wanted:
            diff = ", ".join(f"{k}: run={saved.get(k)!r} config={wanted.get(k)!r}"
                             for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k))
            raise PipelineError(f"run {run_id} was trained with another model config ({diff}); "
                                "pass the same model options or run stage=train")
    log.info("using the artifacts of earlier run %s", run_id)
    tracker.set_tags({"from_run": run_id})
    return manifest


def _run_stage(name: str, ctx: Context, by_name: bool) -> StageResult:
    tracker = ctx.tracker
    with tracker.run(name, tags={"stage": name}):
        start = time.perf_counter()
        try:
            result = STAGES[name](ctx)
        except StageUnavailable as err:
            result = StageResult(status="failed" if by_name else "skipped", reason=str(err))
            log.warning("stage %s %s: %s", name, "cannot run" if by_name else "skipped", err)
        except (PipelineError, DataError, DatasetNotFoundError) as err:
            tracker.set_tags({"status": "failed", "reason": str(err)[:5000]})
            raise PipelineError(f"stage {name}: {err}") from err
        except Exception as err:
            tracker.set_tags({"status": "failed", "reason": f"{type(err).__name__}: {err}"[:5000]})
            raise
        result.metrics.setdefault("stage_seconds", time.perf_counter() - start)
        tracker.log_metrics(result.metrics)
        tracker.log_dict({"status": result.status, "reason": result.reason, "metrics": result.metrics}, "metrics.json")
        tags = {"status": result.status}
        if result.reason:
            tags["skip_reason" if result.status == "skipped" else "reason"] = result.reason
        if result.failures:
            tags["failed_variants"] = _listing(result.failures)
        tracker.set_tags(tags)
        for artifact in result.artifacts.values():
            if Path(artifact).exists():
                tracker.log_artifact(artifact)
    return result
