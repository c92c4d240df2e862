"""The raw id <-> model id vocabulary of a dataset read from a user's log, saved beside the checkpoint.

    vocabulary.json          {"users": [raw ids in model user order], "items": [raw id of model item 1, 2, ...]}
    vocabulary.json.sha256   its digest (pipeline.integrity): a changed file is refused, never served

Raw ids keep their type: JSON integers for integer ids, strings for text ids. Model item id i is
items[i - 1]; 0 is padding.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.data.readers import DataError, Interactions
from pipeline.integrity import verify_digest, write_digest

VOCABULARY_FILE = "vocabulary.json"


def _plain(values: np.ndarray) -> list:
    return [v if isinstance(v, str) else int(v) for v in values.tolist()]


def write_vocabulary(folder: Path | str, interactions: Interactions) -> Path:
    """Writes <folder>/vocabulary.json and its digest -> the path."""
    path = Path(folder) / VOCABULARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"users": _plain(np.asarray(interactions.raw_user_ids)),
            "items": _plain(np.asarray(interactions.raw_item_ids)[1:])}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    tmp.replace(path)
    write_digest(path)
    return path


def read_vocabulary(path: Path | str) -> dict[str, list]:
    """The vocabulary written by write_vocabulary, after checking its digest."""
    path = Path(path)
    verify_digest(path)
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("items"), list) or not data["items"]:
        raise DataError(f"{path}: not a vocabulary (expected {{\"users\": [...], \"items\": [...]}})")
    return data


def raw_item_ids(items: list) -> np.ndarray:
    """The vocabulary's items as Interactions.raw_item_ids: index = model id, [0] padding."""
    if all(isinstance(v, int) for v in items):
        return np.array([-1, *items], dtype=np.int64)
    return np.array([None, *[str(v) for v in items]], dtype=object)
