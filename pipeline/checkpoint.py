"""Checkpoints carry the config that made them and a digest (pipeline.integrity); loading refuses one that
does not match either."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core import PipelineError
from pipeline.integrity import verify_digest, write_digest

FORMAT_VERSION = 1


class CheckpointError(PipelineError):
    pass


def save_checkpoint(path: Path, model: nn.Module, model_cfg: dict, num_items: int, extra: dict | None = None) -> Path:
    payload = {
        "format_version": FORMAT_VERSION,
        "model_config": model_cfg,
        "num_items": num_items,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # a crash mid-write never leaves a half checkpoint under the real name
    write_digest(path)
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    verify_digest(path)  # bytes overwritten in the middle of a zip still load: the digest is what notices
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated?): {err}") from err
    missing = {"format_version", "model_config", "num_items", "state_dict"} - set(payload)
    if not isinstance(payload, dict) or missing:
        raise CheckpointError(f"{path} is not a genrec checkpoint (missing {sorted(missing)})")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format {payload['format_version']}, this code reads {FORMAT_VERSION}")
    return payload


def load_checkpoint(path: Path, expected_model_cfg: dict | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """-> (model in eval mode on CPU, payload). With expected_model_cfg, refuses a checkpoint made by another config."""
    from pipeline.models import build_model

    payload = read_checkpoint(path)
    saved = payload["model_config"]
    if expected_model_cfg is not None and dict(expected_model_cfg) != dict(saved):
        diff = sorted(
            f"{k}: checkpoint={saved.get(k)!r} config={expected_model_cfg.get(k)!r}"
            for k in set(saved) | set(expected_model_cfg)
            if saved.get(k) != expected_model_cfg.get(k)
        )
        raise CheckpointError(
            f"checkpoint {path} was made with another model config ({'; '.join(diff)}); "
            "train again with this config or use the config the checkpoint was made with"
        )
    model = build_model(_AttrDict(saved), payload["num_items"])
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not fit the model its config describes: {err}") from err
    return model.eval(), payload


class _AttrDict(dict):
    """build_model reads configs by attribute, like a DictConfig."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err
