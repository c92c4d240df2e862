"""Datasets for next-item recommendation: readers, a synthetic generator and leave-one-out splits.

    interactions = load_interactions(cfg.data)           # per-user item sequences, ids 1..num_items
    splits = leave_one_out(interactions, max_len=200)    # padded torch tensors for train/valid/test

Everything here is a pure function of its inputs (apart from reading and downloading data files).
"""

from pipeline.data.download import DATASET_NAMES, DatasetNotFoundError, load_interactions
from pipeline.data.readers import (
    DataError,
    Interactions,
    interactions_from_ratings,
    interactions_from_sequences,
    read_grouplens_ratings,
    read_user_sequences,
)
from pipeline.data.splits import Split, Splits, TrainSequences, leave_one_out, train_with_validation
from pipeline.data.synthetic import generate_synthetic


def load_splits(cfg) -> Splits:
    """The leave-one-out splits a run trains and evaluates on: cfg.data read, histories capped to cfg.model.max_len."""
    return leave_one_out(load_interactions(cfg.data), cfg.model.max_len)


__all__ = [
    "DATASET_NAMES",
    "DataError",
    "DatasetNotFoundError",
    "Interactions",
    "Split",
    "Splits",
    "TrainSequences",
    "generate_synthetic",
    "interactions_from_ratings",
    "interactions_from_sequences",
    "leave_one_out",
    "load_splits",
    "load_interactions",
    "read_grouplens_ratings",
    "read_user_sequences",
    "train_with_validation",
]
