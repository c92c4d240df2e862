"""The champion package: what promote registers in the MLflow registry and what deploy serves. A folder:

    package.json    the variant (artifact relative to the folder), the model's config, top_k, the
                    validation metrics and the fingerprint of the host that measured them
    <artifact>      the variant's files: checkpoint, .onnx (+ its external data), .pt2, TensorRT program,
                    with their digest <artifact>.sha256 (pipeline.integrity)
    plan/           a TensorRT variant's Triton model (config.pbtxt, 1/model.plan), when the trt stage made one
    item_ids.npy    the raw item id of each model item id (index 0 is padding: -1); a str array when the ids
                    are text (a log read by data=interactions with string ids): requests then send strings
    examples.json   a few test-split histories (raw ids) for the smoke test, `make query` and the load test
    example_timestamps.json   for a time-bias model: the unix seconds of each example's actions
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline.core import PipelineError, Variant, file_digest
from pipeline.integrity import artifact_files, sidecar
from pipeline.serving.models.common import Vocabulary, check_timestamps, pad

PACKAGE_FILE, ITEM_IDS_FILE, EXAMPLES_FILE = "package.json", "item_ids.npy", "examples.json"
EXAMPLE_TIMES_FILE = "example_timestamps.json"
PLAN_DIR = "plan"  # options["triton_model"] of a TensorRT variant, relative to the package


@dataclass
class Package:
    root: Path
    variant: Variant          # artifact: the absolute path inside root
    model_config: dict[str, Any]
    top_k: int                # the most items one answer can hold
    info: dict[str, Any]      # metrics, fingerprint, where it came from
    examples: list[list[int | str]]
    vocabulary: Vocabulary
    example_timestamps: list[list[int]] | None = None  # a time-bias model's: aligned with examples

    @property
    def max_len(self) -> int:
        return int(self.model_config["max_len"])

    @property
    def artifact_name(self) -> str:
        return Path(self.variant.artifact).name

    def load(self, device: torch.device = torch.device("cpu")) -> Callable:
        """The variant through the pipeline's own loader, as validate ran it."""
        from pipeline.variants import load_variant

        return load_variant(self.variant, device, self.top_k)

    def example(self, index: int) -> tuple[list, list[int] | None]:
        """The index-th packaged test history and, for a time-bias model, its timestamps."""
        index %= len(self.examples)
        return self.examples[index], None if self.example_timestamps is None else self.example_timestamps[index]

    @property
    def time_bias(self) -> bool:
        return bool(self.model_config.get("time_bias"))

    @torch.no_grad()
    def recommend(self, predict: Callable, history: list, k: int, device: torch.device = torch.device("cpu"),
                  timestamps: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The pipeline's own answer for one raw history (and, for a time-bias model, the unix seconds of its
        actions), from a variant loaded on `device`: (raw item ids [k], scores [k])."""
        padded, lengths = pad(self.vocabulary.encode(np.asarray([history])), self.max_len)
        times = None
        if self.time_bias:
            given = np.asarray([timestamps]) if timestamps is not None else None
            times = torch.from_numpy(pad(check_timestamps(given, np.asarray([history])), self.max_len)[0]).to(device)
        ids, scores = predict(torch.from_numpy(padded).to(device), torch.from_numpy(lengths).reshape(-1).to(device),
                              times)
        return self.vocabulary.decode(ids[0, :k].cpu().numpy()), scores[0, :k].float().cpu().numpy()


def write_package(dst: Path, variant: Variant, *, model_config: dict, top_k: int, raw_item_ids: np.ndarray,
                  examples: list[list[int | str]], info: dict[str, Any],
                  example_timestamps: list[list[int]] | None = None) -> Package:
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    name = _copy_variant_files(Path(variant.artifact), dst)
    spec = {**variant.to_dict(), "artifact": name}
    if variant.options.get("triton_model"):
        shutil.copytree(variant.options["triton_model"], dst / PLAN_DIR)
        spec["options"] = {**variant.options, "triton_model": PLAN_DIR}
    manifest = {"variant": spec, "model_config": model_config, "top_k": top_k, "info": info}
    (dst / PACKAGE_FILE).write_text(json.dumps(manifest, indent=2, default=str))
    np.save(dst / ITEM_IDS_FILE, Vocabulary(raw_item_ids).raw)  # int64, or a str array for text ids
    (dst / EXAMPLES_FILE).write_text(json.dumps([[i if isinstance(i, str) else int(i) for i in h] for h in examples]))
    if example_timestamps is not None:
        (dst / EXAMPLE_TIMES_FILE).write_text(json.dumps([[int(t) for t in ts] for ts in example_timestamps]))
    return read_package(dst)


def read_package(root: Path) -> Package:
    root = Path(root)
    if not (root / PACKAGE_FILE).is_file():
        raise PipelineError(f"{root} is not a champion package (no {PACKAGE_FILE}); register one with stage=promote")
    manifest = json.loads((root / PACKAGE_FILE).read_text())
    spec = manifest["variant"]
    options = {**spec["options"], **({"triton_model": str(root / PLAN_DIR)} if (root / PLAN_DIR).is_dir() else {})}
    variant = Variant(**{**spec, "artifact": str(root / spec["artifact"]), "options": options})
    return Package(
        root=root, variant=variant, model_config=manifest["model_config"], top_k=int(manifest["top_k"]),
        info=manifest["info"], examples=json.loads((root / EXAMPLES_FILE).read_text()),
        vocabulary=Vocabulary(np.load(root / ITEM_IDS_FILE)),
        example_timestamps=json.loads((root / EXAMPLE_TIMES_FILE).read_text())
        if (root / EXAMPLE_TIMES_FILE).is_file() else None,
    )


def variant_digest(variant: Variant) -> str:
    """Identifies what a variant serves: its name and the bytes of its files."""
    blob = f"{variant.name}\n{file_digest(sorted(artifact_files(variant.artifact)))}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _copy_variant_files(artifact: Path, dst: Path) -> str:
    """Copies the variant's files and their digest into dst, keeping the names the artifact refers to;
    -> the artifact's name."""
    digest = sidecar(artifact)
    for path in [*artifact_files(artifact), *([digest] if digest.is_file() else [])]:
        target = dst / path.relative_to(artifact.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return artifact.name
