"""The calibration set (user histories sampled with a seed from the training split only) and the
calibration cache: per-tensor activation ranges as JSON, tied to the model and the data they came from.

A cache records the digest of the model it was computed on (the fp32 ONNX file, or the checkpoint for the
PyTorch path), the digest of the calibration set, and the method. Reusing it with another model, other data
or another method is refused with a message that says which of them differs.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.core import PipelineError
from pipeline.data import TrainSequences

METHODS = ("minmax", "entropy", "percentile")
CACHE_FORMAT = "genrec-calibration-cache/1"


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    """N training-split histories, right-padded like the eval splits: history [N, L], lengths [N],
    timestamps [N, L] or None; users: the row of each in the training sequences."""

    history: torch.Tensor
    lengths: torch.Tensor
    timestamps: torch.Tensor | None
    users: torch.Tensor
    seed: int

    @property
    def size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def digest(self) -> str:
        """sha256 of the histories, lengths and timestamps: equal sets have equal digests."""
        h = hashlib.sha256()
        for tensor in (self.history, self.lengths, self.timestamps):
            if tensor is not None:
                array = np.ascontiguousarray(tensor.cpu().numpy())
                h.update(str((array.dtype.str, array.shape)).encode())
                h.update(array.tobytes())
        return h.hexdigest()

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """{"history", "lengths"[, "timestamps"]} batches in order (the same order every time)."""
        for start in range(0, self.size, batch_size):
            sl = slice(start, start + batch_size)
            batch = {"history": self.history[sl], "lengths": self.lengths[sl]}
            if self.timestamps is not None:
                batch["timestamps"] = self.timestamps[sl]
            yield batch


def sample_calibration(train: TrainSequences, num_users: int, seed: int, max_len: int) -> CalibrationSet:
    """num_users training sequences drawn without replacement with `seed` (all of them when fewer). Each
    history is the sequence's input part (what the model reads in training: all but its last training
    item), capped to the max_len most recent items, right-padded."""
    if num_users < 1:
        raise PipelineError(f"int8.calibration.num_users must be >= 1, got {num_users}")
    total = int(train.lengths.shape[0])
    if total == 0:
        raise PipelineError("the training split has no sequences to calibrate on")
    gen = torch.Generator().manual_seed(int(seed))
    users = torch.randperm(total, generator=gen)[: min(num_users, total)].sort().values
    items, lengths = train.items[users], train.lengths[users] - 1  # inputs: items[:, :len-1]
    width = min(max_len, int(lengths.max()))
    history = torch.zeros(len(users), width, dtype=torch.int64)
    timestamps = None if train.timestamps is None else torch.zeros(len(users), width, dtype=torch.int64)
    for row, n in enumerate(lengths.tolist()):
        first = max(0, n - width)  # the most recent `width` items
        history[row, : n - first] = items[row, first:n]
        if timestamps is not None:
            timestamps[row, : n - first] = train.timestamps[users[row], first:n]
    return CalibrationSet(history, lengths.clamp(max=width), timestamps, users, int(seed))


@dataclass
class CalibrationCache:
    """Per-tensor activation ranges {tensor: [min, max]} of one quantization path ("onnx_qdq" or
    "torchao_pt2e"), with what they were computed on. `extra` holds what a path needs besides the ranges
    (torchao: each observer's scale and zero point)."""

    kind: str
    method: str
    model_digest: str
    data_digest: str
    num_users: int
    seed: int
    ranges: dict[str, list[float]]
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({"format": CACHE_FORMAT, **asdict(self)}, indent=1, sort_keys=True))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> "CalibrationCache":
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"calibration cache {path} does not exist; set int8.calibration.cache=auto to calibrate")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PipelineError(f"calibration cache {path} is not valid JSON ({err}); delete it or calibrate again "
                                "with int8.calibration.cache=auto") from err
        if not isinstance(raw, dict) or raw.get("format") != CACHE_FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise PipelineError(f"calibration cache {path} has format {found!r}, expected {CACHE_FORMAT!r}")
        names = ("kind", "method", "model_digest", "data_digest", "num_users", "seed", "ranges")
        missing = [n for n in names if n not in raw]
        if missing:
            raise PipelineError(f"calibration cache {path} lacks {', '.join(missing)}: it is corrupt")
        ranges = raw["ranges"]
        bad = [k for k, v in ranges.items() if not (isinstance(v, list) and len(v) == 2
                                                   and all(isinstance(x, (int, float)) for x in v) and v[0] <= v[1])]
        if not isinstance(ranges, dict) or not ranges or bad:
            raise PipelineError(f"calibration cache {path} has malformed ranges (each must be [min, max], min <= max)"
                                + (f": {', '.join(bad[:5])}" if bad else ""))
        return cls(**{n: raw[n] for n in names}, extra=raw.get("extra", {}))

    def check(self, *, kind: str, model_digest: str, data_digest: str, method: str, source: str) -> None:
        """Raises PipelineError naming what differs between this cache and the run that wants to reuse it."""
        differs = []
        if self.kind != kind:
            differs.append(f"it is a {self.kind} cache, this is the {kind} path")
        if self.model_digest != model_digest:
            differs.append(f"model digest {self.model_digest[:12]} != {model_digest[:12]} (another model)")
        if self.data_digest != data_digest:
            differs.append(f"calibration data digest {self.data_digest[:12]} != {data_digest[:12]} "
                           f"(cache: {self.num_users} users, seed {self.seed})")
        if self.method != method:
            differs.append(f"method {self.method} != {method}")
        if differs:
            raise PipelineError(f"calibration cache {source} does not match this run: {'; '.join(differs)}. "
                                "Calibrate again (int8.calibration.cache=auto) or pass the matching cache")
