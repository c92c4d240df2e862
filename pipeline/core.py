"""What stages share: the context they run in, what they return, and the variants they produce."""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch

if TYPE_CHECKING:  # annotations only: the GPU bench imports this without omegaconf installed
    from omegaconf import DictConfig

    from pipeline.catalogue import VariantSpec

log = logging.getLogger(__name__)
T = TypeVar("T")

STAGE_ORDER = ("train", "compile", "trt", "onnx", "int8", "validate", "promote", "deploy")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DEVICES = ("auto", "cpu", "cuda")


class PipelineError(RuntimeError):
    """An error a user can fix: bad config, missing input. Printed without a traceback."""

    exit_code = 1


class ConfigError(PipelineError):
    """Bad input the user must fix: it stops the stage even inside one variant's build (build_variant)."""


class StageUnavailable(PipelineError):
    """The stage cannot run on this host (no CUDA, no TensorRT): skipped in stage=all, exit 2 by name."""

    exit_code = 2


@dataclass
class Variant:
    """One deployable form of the model; every variant answers history -> top-K ids and scores.
    Made by VariantSpec.variant (pipeline.catalogue): name, backend and precision are its spec's, and the
    spec's fields are in options, so `spec` reads it back."""

    name: str                # the spec's name, e.g. "eager-fp32", "inductor-max-autotune-bf16", "onnxruntime-fp32"
    backend: str             # eager | inductor | aoti | onnxruntime | tensorrt | torchao | int8_table
    precision: str
    artifact: str            # the file that holds it (checkpoint, .pt2, .onnx, engine)
    stage: str               # the stage that produced it
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name != self.spec.name:
            raise PipelineError(f"variant '{self.name}' ({self.backend}, {self.precision}, {self.options}) is named "
                                f"'{self.spec.name}' by the catalogue's rule (pipeline/catalogue.py)")

    @property
    def spec(self) -> VariantSpec:
        from pipeline.catalogue import VariantSpec

        return VariantSpec.from_options(self.backend, self.precision, self.options)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StageResult:
    status: Literal["ok", "skipped", "failed"] = "ok"
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    variants: list[Variant] = field(default_factory=list)
    # Variants the stage tried and could not build or load: name -> reason. The run goes on without them;
    # validate lists them as failed and promote never sees them.
    failures: dict[str, str] = field(default_factory=dict)


@dataclass
class Manifest:
    """What one stage hands the next: paths and metrics, per stage. Saved as manifest.json."""

    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record(self, stage: str, result: StageResult) -> None:
        self.stages[stage] = {
            "status": result.status,
            "reason": result.reason,
            "metrics": dict(result.metrics),
            "artifacts": dict(result.artifacts),
            "variants": [v.to_dict() for v in result.variants],
            "failures": dict(result.failures),
        }

    def artifact(self, name: str) -> str | None:
        for entry in self.stages.values():
            if name in entry.get("artifacts", {}):
                return entry["artifacts"][name]
        return None

    def metric(self, name: str) -> float | None:
        """A metric an earlier stage recorded (e.g. compile_seconds_<variant>), or None."""
        for entry in self.stages.values():
            if name in entry.get("metrics", {}):
                return entry["metrics"][name]
        return None

    def variants(self) -> list[Variant]:
        return [Variant(**v) for entry in self.stages.values() for v in entry.get("variants", [])]

    def failures(self) -> dict[str, str]:
        """Every variant an earlier stage failed to build: name -> reason."""
        return {name: why for entry in self.stages.values() for name, why in entry.get("failures", {}).items()}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"stages": self.stages}, indent=2))

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        return cls(stages=json.loads(Path(path).read_text())["stages"])


@dataclass
class Context:
    """Everything a stage may use. Stages never import each other; they read the manifest."""

    cfg: DictConfig
    device: torch.device
    run_dir: Path
    manifest: Manifest
    tracker: Any  # pipeline.tracking.Tracker

    def require_artifact(self, name: str) -> Path:
        path = self.manifest.artifact(name)
        if path is None:
            raise PipelineError(
                f"no '{name}' from an earlier stage: run stage=train first in this invocation, "
                "or pass from_run=<parent run id> of a run that has one"
            )
        if not Path(path).exists():
            raise PipelineError(f"'{name}' recorded at {path} but the file is gone; run stage=train again")
        return Path(path)


def failure_reason(err: BaseException, limit: int = 300) -> str:
    """'ExceptionType: first line of the message', short enough for a table cell and an MLflow tag."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_variant(ctx: Context, name: str, failures: dict[str, str], build: Callable[[], T],
                  tags: dict[str, str] | None = None) -> T | None:
    """build() for one variant (build it, check it, load it), or None when it raises: the reason goes to
    failures[name], the log and a FAILED nested MLflow run `variant:<name>`, and the stage goes on with its
    other variants. A ConfigError still stops the stage: it is the user's to fix, not the variant's."""
    try:
        return build()
    except ConfigError:
        raise
    except Exception as err:  # whatever a backend raises: one variant's failure is not the run's
        failures[name] = failure_reason(err)
        log.warning("%s failed; the run goes on without it: %s", name, err)
        ctx.tracker.record_failed_variant(name, failures[name], tags or {})
        return None


def file_digest(paths: Iterable[Path], algorithm: str = "sha256") -> str:
    """Hex digest over the bytes of the given files, in the order given (downloads, model files)."""
    hasher = hashlib.new(algorithm)
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                hasher.update(block)
    return hasher.hexdigest()
