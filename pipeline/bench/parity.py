"""A quick parity check of a freshly built variant against fp32 eager on a sample of test users, so that a
broken export fails in the stage that built it; validate later measures every variant in full.

fp32 eager's answer on the sample is computed once per run, by the train stage (save_reference), and the
later stages read it (load_reference) instead of rebuilding the reference model."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from pipeline.core import PipelineError
from pipeline.data import Split
from pipeline.evaluation import parity, predict_top_k, top_k_metrics
from pipeline.gates import Gate, check
from pipeline.integrity import verify_digest, write_digest


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


def save_reference(cfg, checkpoint: str, path: Path) -> Path:
    """fp32 eager's top-K (validate.top_k) on the first gates.sample.num_users test users -> path, with its
    digest and the checkpoint's. Runs on the CPU: exact fp32, whatever TF32 setting a GPU run has."""
    from pipeline.data import load_splits
    from pipeline.variants import build_retriever

    cpu, sample_cfg = torch.device("cpu"), cfg.gates.sample
    sample = head(load_splits(cfg).test, sample_cfg.num_users)
    top_k = cfg.validate.top_k
    ids, scores = predict_top_k(build_retriever(checkpoint, top_k, "fp32", cpu), sample, sample_cfg.batch_size, cpu)
    torch.save({"top_k": top_k, "target": sample.target, "ids": ids, "scores": scores,
                "checkpoint_sha256": verify_digest(checkpoint)}, path)
    write_digest(path)
    return Path(path)


def load_reference(cfg, path: Path, checkpoint: str, top_k: int) -> tuple[Split, tuple[torch.Tensor, torch.Tensor]]:
    """-> (the sample of test users, fp32 eager's (ids, scores) on them, top_k of each) from save_reference's
    file; refuses one made for another checkpoint, other data or a smaller K."""
    from pipeline.data import load_splits

    verify_digest(path)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved["checkpoint_sha256"] != verify_digest(checkpoint):
        raise PipelineError(f"{path} is the reference answer of another checkpoint than {checkpoint}; run stage=train again")
    sample = head(load_splits(cfg).test, saved["target"].shape[0])
    if not torch.equal(sample.target, saved["target"]):
        raise PipelineError(f"{path} was made on other test users than this data config gives; run stage=train again")
    if top_k > saved["top_k"]:
        raise PipelineError(f"the reference answer holds the top-{saved['top_k']} (validate.top_k when it was "
                            f"trained), {top_k} was asked: set the stages' top_k to at most validate.top_k")
    return sample, (saved["ids"][:, :top_k], saved["scores"][:, :top_k])


def check_parity(
    name: str,
    predict: Callable,
    reference: tuple[torch.Tensor, torch.Tensor],
    sample: Split,
    gate: Gate,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """-> parity metrics and hr10_delta of `predict` against the reference answer on `sample`.

    Raises PipelineError when the variant fails the overlap or score-error part of its gate.
    """
    ids, scores = predict_top_k(predict, sample, batch_size, device)
    metrics = parity(ids, scores, *reference)
    metrics["hr10_delta"] = (
        top_k_metrics(ids, sample.target, ks=(10,))["hr10"] - top_k_metrics(reference[0], sample.target, ks=(10,))["hr10"]
    )
    passed, why = check(metrics, gate.parity_only())
    if not passed:
        raise PipelineError(f"{name}: against fp32 eager on {sample.target.shape[0]} test users, {why}: "
                            "the export is wrong, or the gate too strict")
    return metrics
