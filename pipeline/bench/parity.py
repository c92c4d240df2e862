"""A quick parity check of a freshly built variant against fp32 eager on a sample of test users, so that a
broken export fails in the stage that built it; validate later measures every variant in full."""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from pipeline.core import PipelineError
from pipeline.data import Split
from pipeline.evaluation import parity, predict_top_k, top_k_metrics


def head(split: Split, num_users: int) -> Split:
    """The first num_users users of a split."""
    sl = slice(0, num_users)
    return Split(
        history=split.history[sl],
        lengths=split.lengths[sl],
        target=split.target[sl],
        timestamps=None if split.timestamps is None else split.timestamps[sl],
        target_timestamps=None if split.target_timestamps is None else split.target_timestamps[sl],
    )


def reference_answer(cfg, checkpoint: str, num_users: int, batch_size: int, top_k: int) -> tuple[Split, tuple]:
    """-> (the first num_users test users, fp32 eager's (ids, scores) on them).

    The reference runs on the CPU: exact fp32, whatever TF32 setting a GPU run has.
    """
    from pipeline.data import load_splits
    from pipeline.variants import build_retriever

    cpu = torch.device("cpu")
    sample = head(load_splits(cfg).test, num_users)
    return sample, predict_top_k(build_retriever(checkpoint, top_k, "fp32", cpu), sample, batch_size, cpu)


def check_parity(
    name: str,
    predict: Callable,
    reference: tuple[torch.Tensor, torch.Tensor],
    sample: Split,
    gates: Mapping[str, float | None],
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """-> parity metrics and hr10_delta of `predict` against the reference answer on `sample`.

    Raises PipelineError when the top-K overlap is below gates["min_topk_overlap"] or the largest score
    error above gates["max_abs_err"] (None: not gated).
    """
    ids, scores = predict_top_k(predict, sample, batch_size, device)
    metrics = parity(ids, scores, *reference)
    metrics["hr10_delta"] = (
        top_k_metrics(ids, sample.target, ks=(10,))["hr10"] - top_k_metrics(reference[0], sample.target, ks=(10,))["hr10"]
    )
    overlap, err = metrics["parity_topk_overlap"], metrics["parity_max_abs_err"]
    users = sample.target.shape[0]
    if gates.get("min_topk_overlap") is not None and overlap < gates["min_topk_overlap"]:
        raise PipelineError(
            f"{name}: top-K overlap with fp32 eager on {users} test users is {overlap:.4f}, below the gate "
            f"{gates['min_topk_overlap']} (parity.min_topk_overlap): the export is wrong, or the gate too strict"
        )
    if gates.get("max_abs_err") is not None and err > gates["max_abs_err"]:
        raise PipelineError(
            f"{name}: largest score error against fp32 eager on {users} test users is {err:.3g}, above the gate "
            f"{gates['max_abs_err']} (parity.max_abs_err): the export is wrong, or the gate too strict"
        )
    return metrics
