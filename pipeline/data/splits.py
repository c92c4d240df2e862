"""Leave-one-out splits: per user, the last item is the test target, the one before it validation.

This is the protocol of the published ML-1M and Amazon results (SASRec, S3-Rec, HSTU), so numbers
computed on these splits are comparable with theirs. Every tensor is right-padded with 0, the
padding item id, and holds the most recent items when a history is longer than `max_len`.
"""

import logging
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.readers import DataError, Interactions

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)  # eq=False: == on tensors is elementwise, not a bool
class Split:
    """One evaluation split (valid or test): for each user, a history and the item to predict.

    Attributes:
        history: int64 [U, L]; the most recent <= L items before the target in time order at
            positions 0..len-1, then 0.
        lengths: int64 [U], in 1..L.
        target: int64 [U].
        timestamps: int64 [U, L] aligned with `history` (0 at padding), or None.
        target_timestamps: int64 [U], the time of the target event, or None.
    """

    history: torch.Tensor
    lengths: torch.Tensor
    target: torch.Tensor
    timestamps: torch.Tensor | None
    target_timestamps: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class TrainSequences:
    """Next-item training sequences: inputs are items[:, :-1], labels items[:, 1:].

    Attributes:
        items: int64 [U, L+1], right-padded with 0; the most recent <= L+1 training items (all but
            the last two of each user). Users with fewer than 2 training items are left out.
        lengths: int64 [U], in 2..L+1.
        timestamps: int64 [U, L+1] aligned with `items` (0 at padding), or None.
    """

    items: torch.Tensor
    lengths: torch.Tensor
    timestamps: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class Splits:
    """Train sequences and the valid/test splits of one dataset; item ids are in 1..num_items."""

    train: TrainSequences
    valid: Split
    test: Split
    num_items: int


def leave_one_out(interactions: Interactions, max_len: int) -> Splits:
    """Splits every user's sequence into training items, a validation target and a test target.

    The test history is every item before the last one; the validation history every item before
    the second-to-last one; training uses the rest. Users with fewer than 3 interactions cannot
    give all three and are dropped (the count is logged).

    Args:
        max_len: L, the longest history kept; training sequences keep L+1 items so that inputs
            and labels each have L positions.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"leave_one_out: max_len must be an integer >= 1, got {max_len!r}")
    counts = np.array([len(sequence) for sequence in interactions.sequences], dtype=np.int64)
    kept = np.flatnonzero(counts >= 3)
    if len(kept) < len(counts):
        logger.info(
            "%s: dropped %d of %d users with fewer than 3 interactions",
            interactions.name,
            len(counts) - len(kept),
            len(counts),
        )
    if len(kept) == 0:
        raise DataError(
            f"{interactions.name}: no user has the 3 interactions leave-one-out needs "
            "(train, valid and test); use a dataset with longer histories"
        )
    items = _concatenate(interactions.sequences, kept)
    times = None
    if interactions.timestamps is not None:
        times = _concatenate(interactions.timestamps, kept)
    counts = counts[kept]
    ends = np.cumsum(counts)  # one past each user's last interaction in the flat arrays
    train_users = np.flatnonzero(counts >= 4)  # 2 training items give one input-label pair
    return Splits(
        train=_train_sequences(
            items, times, ends[train_users] - 2, counts[train_users] - 2, max_len + 1
        ),
        valid=_split(items, times, ends - 2, counts - 2, max_len),
        test=_split(items, times, ends - 1, counts - 1, max_len),
        num_items=interactions.num_items,
    )


def _concatenate(arrays: list[np.ndarray], users: np.ndarray) -> np.ndarray:
    return np.concatenate([arrays[u] for u in users]).astype(np.int64, copy=False)


def _split(items, times, target_at, available, max_len) -> Split:
    """The split whose target is items[target_at], with history the `available` items before it."""
    lengths = np.minimum(available, max_len)
    return Split(
        history=_window(items, target_at, lengths, max_len),
        lengths=torch.from_numpy(lengths),
        target=torch.from_numpy(items[target_at]),
        timestamps=None if times is None else _window(times, target_at, lengths, max_len),
        target_timestamps=None if times is None else torch.from_numpy(times[target_at]),
    )


def _train_sequences(items, times, end, available, width) -> TrainSequences:
    lengths = np.minimum(available, width)
    return TrainSequences(
        items=_window(items, end, lengths, width),
        lengths=torch.from_numpy(lengths),
        timestamps=None if times is None else _window(times, end, lengths, width),
    )


def _window(flat: np.ndarray, end: np.ndarray, lengths: np.ndarray, width: int) -> torch.Tensor:
    """Rows flat[end - length : end], right-padded with 0 to `width`: an int64 [U, width] tensor."""
    offsets = np.arange(width)
    valid = offsets < lengths[:, None]
    index = np.where(valid, (end - lengths)[:, None] + offsets, 0)
    window = flat[index].astype(np.int64, copy=False)
    del index
    window[~valid] = 0  # in place: a window of millions of users is hundreds of MB
    return torch.from_numpy(window)


def train_with_validation(splits: Splits) -> TrainSequences:
    """Training sequences that also hold each user's validation item: every item before the test one.

    For a refit after the epoch count was chosen on validation, as the published protocol trains on
    all but the last item. The test history already is that sequence (capped to L items).
    """
    test = splits.test
    keep = test.lengths >= 2
    return TrainSequences(
        items=test.history[keep],
        lengths=test.lengths[keep],
        timestamps=None if test.timestamps is None else test.timestamps[keep],
    )
