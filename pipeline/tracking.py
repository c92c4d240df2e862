"""All MLflow calls: the parent run of an invocation, nested stage and variant runs, params, tags,
metrics, artifacts, and finding the manifest of an earlier run."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import ARTIFACTS, PROJECT_ROOT
from pipeline.core import Manifest

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
# Registry aliases: the version deploy serves, and the one it replaced (to roll back to).
CHAMPION, PREVIOUS = "champion", "previous"
# MLflow refuses param values over 6000 characters and batches over 100 params.
_MAX_PARAM_CHARS = 6000
_PARAM_BATCH = 100


def default_tracking_uri(artifacts_dir: Path = ARTIFACTS) -> str:
    return f"sqlite:///{Path(artifacts_dir).resolve() / 'mlflow.db'}"


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, str]:
    """{"model": {"dim": 64}} -> {"model.dim": "64"}; lists become their string form."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, str] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)[:_MAX_PARAM_CHARS]
    return flat


def lineage_key(cfg: DictConfig) -> str:
    """Runs with the same data and model config can hand each other checkpoints."""
    blob = json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True) + json.dumps(
        OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # platform.processor() is empty on Linux; the kernel knows the model name
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_tags(device: torch.device) -> dict[str, str]:
    return {
        "device": device.type,
        "device_name": device_name(device),
        "cuda": str(torch.version.cuda) if device.type == "cuda" else "none",
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "tensorrt_version": _version("tensorrt"),
        "torch_tensorrt_version": _version("torch-tensorrt"),
        "onnxruntime_version": _version("onnxruntime"),
        "mlflow_version": _version("mlflow-skinny") if _version("mlflow") == "absent" else _version("mlflow"),
        "git_commit": _git_commit(),
    }


class Tracker:
    """A thin owner of MLflow state for one invocation."""

    def __init__(self, cfg: DictConfig, artifacts_dir: Path = ARTIFACTS):
        import mlflow  # imported here so that `--help` and config errors stay fast

        for noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.mlflow = mlflow
        self.uri = cfg.tracking_uri or default_tracking_uri(artifacts_dir)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.uri)
        self.client = mlflow.MlflowClient(self.uri)
        self.parent_run_id: str | None = None  # the invocation's run, once started
        experiment = self.client.get_experiment_by_name(cfg.experiment_name)
        if experiment is None:
            artifact_root = None
            if self.uri.startswith("sqlite:") or self.uri.startswith("file:"):
                artifact_root = (Path(artifacts_dir).resolve() / "mlruns").as_uri()
            self.experiment_id = self.client.create_experiment(cfg.experiment_name, artifact_location=artifact_root)
        else:
            self.experiment_id = experiment.experiment_id
        mlflow.set_experiment(experiment_id=self.experiment_id)

    @contextmanager
    def run(self, name: str, tags: dict[str, str] | None = None, nested: bool = True) -> Iterator[Any]:
        """A run nested under the active one; FAILED if the block raises."""
        with self.mlflow.start_run(run_name=name, nested=nested, tags=tags or {}) as active:
            if not nested:
                self.parent_run_id = active.info.run_id
            yield active

    def record_failed_variant(self, name: str, reason: str, tags: dict[str, str]) -> None:
        """A FAILED nested run `variant:<name>` for a variant that could not be built, checked or loaded,
        tagged status=failed, reason, and the stage of the run it nests under."""
        active = self.mlflow.active_run()
        stage = active.data.tags.get("stage", "") if active is not None else ""
        self.mlflow.start_run(run_name=f"variant:{name}", nested=True, tags={
            "variant": name, "stage": stage, **tags, "status": "failed", "reason": reason})
        self.mlflow.end_run(status="FAILED")

    @property
    def active_run_id(self) -> str:
        return self.mlflow.active_run().info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        items = [(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items()]
        for start in range(0, len(items), _PARAM_BATCH):
            self.mlflow.log_params(dict(items[start : start + _PARAM_BATCH]))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        finite = {k: float(v) for k, v in metrics.items() if v is not None}
        if finite:
            self.mlflow.log_metrics(finite, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: Path | str, artifact_path: str | None = None, run_id: str | None = None) -> None:
        """Into the active run, or into `run_id` (e.g. the parent run, for the comparison table)."""
        path = Path(path)
        if run_id is not None:
            log = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
            log(run_id, str(path), artifact_path)
        elif path.is_dir():
            self.mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            self.mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dict(self, data: dict, file: str) -> None:
        self.mlflow.log_dict(data, file)

    def log_text(self, text: str, file: str) -> None:
        self.mlflow.log_text(text, file)

    def log_dataset(self, features: dict[str, Any], name: str, digest: str, context: str) -> None:
        """An input dataset of the active run (MLflow's Datasets: name, digest, schema, size)."""
        dataset = self.mlflow.data.from_numpy(features, name=name, digest=digest)
        self.mlflow.log_input(dataset, context=context)

    def find_manifest(self, key: str, run_id: str | None = None) -> tuple[str, Manifest] | None:
        """The manifest of `run_id`, or of the latest parent run with the same lineage key and a checkpoint."""
        if run_id is None:
            runs = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.lineage_key = '{key}' and tags.has_checkpoint = 'true'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if not runs:
                return None
            run_id = runs[0].info.run_id
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = self.mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=MANIFEST_FILE, dst_path=tmp
                )
            except Exception as err:  # MLflow raises several types for a missing run or file
                raise FileNotFoundError(f"run {run_id} has no {MANIFEST_FILE}: {err}") from err
            return run_id, Manifest.load(Path(local))

    def earlier_variant_runs(self, key: str, exclude_run: str | None, max_runs: int) -> list[dict[str, Any]]:
        """Validate's variant runs of the latest `max_runs` earlier invocations with the same lineage key:
        one row per variant run, {run, start_time, variant, backend, precision, **metrics}."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.lineage_key = '{key}' and tags.stage = 'validate'",
            order_by=["attributes.start_time DESC"],
            max_results=50 * max(max_runs, 1),
        )
        found = [r for r in found if r.data.tags.get("variant") and r.data.tags.get("pipeline_run") != exclude_run]
        keep = list(dict.fromkeys(r.data.tags.get("pipeline_run") for r in found))[:max_runs]
        return [
            {"run": r.data.tags.get("pipeline_run"), "start_time": r.info.start_time,
             **{k: r.data.tags.get(k, "") for k in ("variant", "backend", "precision")}, **r.data.metrics}
            for r in found if r.data.tags.get("pipeline_run") in keep
        ]

    # The model registry. Promotion moves aliases (registry stages are deprecated in MLflow).

    def register_model(self, name: str, package_dir: Path, logged_name: str, tags: dict[str, Any]) -> Any:
        """package_dir -> a logged model of the active run -> a new version of registered model `name`."""
        from mlflow.entities import LoggedModelStatus

        tags = {k: str(v) for k, v in tags.items()}
        logged = self.mlflow.initialize_logged_model(name=logged_name, source_run_id=self.active_run_id, tags=tags)
        try:
            self.client.log_model_artifacts(logged.model_id, str(package_dir))
        except Exception:
            self.mlflow.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        self.mlflow.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        return self.mlflow.register_model(f"models:/{logged.model_id}", name, tags=tags)

    def model_version(self, name: str, alias: str) -> Any | None:
        """The version `alias` points to, or None (no such model or alias)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None

    def find_model_version(self, name: str, tag: str, value: str) -> Any | None:
        """The newest version of registered model `name` whose tag `tag` is `value`, or None."""
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_model_versions(f"name = '{name}'")
        except MlflowException:
            return None
        found = [v for v in versions if v.tags.get(tag) == value]
        return max(found, key=lambda v: int(v.version), default=None)

    def make_champion(self, name: str, version: str) -> str | None:
        """Alias `champion` -> version; the former champion becomes `previous`. -> the former champion's version."""
        former = self.model_version(name, CHAMPION)
        former = None if former is None or str(former.version) == str(version) else str(former.version)
        if former is not None:
            self.client.set_registered_model_alias(name, PREVIOUS, former)
        self.client.set_registered_model_alias(name, CHAMPION, str(version))
        return former

    def set_alias(self, name: str, alias: str, version: str | None) -> None:
        """Alias -> version; None removes the alias (nothing is true to point it at)."""
        from mlflow.exceptions import MlflowException

        if version is not None:
            self.client.set_registered_model_alias(name, alias, str(version))
            return
        try:
            self.client.delete_registered_model_alias(name, alias)
        except MlflowException:
            pass  # no such alias

    def set_model_version_tags(self, name: str, version: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, str(version), key, str(value))

    def download_model_version(self, name: str, version: str, dst: Path) -> Path:
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(self.mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)))


def quiet_mlflow_env() -> None:
    """MLflow prints hints about git and env managers that mean nothing here."""
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
