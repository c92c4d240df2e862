"""train: next-item training with sampled softmax, early stopping on validation HR@10, full-ranking
evaluation on validation and test, a checkpoint with its config, the fp32 eager reference variant and its
answer on the quick checks' sample (reference_answer.pt, read by the later stages)."""
from __future__ import annotations

import copy
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from pipeline.bench.latency import cpu_threads
from pipeline.bench.parity import save_reference
from pipeline.checkpoint import save_checkpoint
from pipeline.catalogue import VariantSpec
from pipeline.core import Context, PipelineError, StageResult
from pipeline.data import Interactions, TrainSequences, leave_one_out, load_interactions, train_with_validation
from pipeline.data.download import INTERACTIONS, table_spec
from pipeline.data.interactions import source_digest
from pipeline.data.vocabulary import write_vocabulary
from pipeline.evaluation import evaluate_full_ranking
from pipeline.models import Retriever, build_model
from pipeline.training import train_epoch

log = logging.getLogger(__name__)

# holdout: early stopping on the validation item, which training never sees.
# all_but_test: the published ML-1M protocol; train on every item but the test one for train.epochs epochs,
# nothing chosen on held-out data (the validation item is a training target, so no validation metrics).
FITS = ("holdout", "all_but_test")


def run(ctx: Context) -> StageResult:
    cfg = ctx.cfg
    artifacts: dict[str, str] = {}

    def on_data(interactions: Interactions) -> None:
        if cfg.data.name == INTERACTIONS:  # the user's own ids: saved beside the checkpoint, served by deploy
            artifacts["vocabulary"] = str(write_vocabulary(ctx.run_dir, interactions))
            log_data_report(ctx.tracker, cfg, interactions)

    checkpoint, metrics = fit(cfg, ctx.device, ctx.run_dir, ctx.tracker.log_metrics, on_data=on_data)
    reference = save_reference(cfg, str(checkpoint), ctx.run_dir / "reference_answer.pt")
    precisions = ["fp32", *([cfg.precision] if cfg.precision in ("fp16", "bf16") else [])]
    variants = [VariantSpec("eager", precision).variant(str(checkpoint), "train") for precision in precisions]
    artifacts.update(checkpoint=str(checkpoint), reference_answer=str(reference))
    return StageResult(metrics=metrics, artifacts=artifacts, variants=variants)


def log_data_report(tracker, cfg, interactions: Interactions) -> None:
    """What reading the log kept and dropped (metrics data_*), and the log as an MLflow dataset with its digest."""
    spec, filters = table_spec(cfg.data)
    digest = source_digest(spec.path, {**vars(spec), **filters})
    report = interactions.report or {}
    tracker.log_metrics({f"data_{key}": value for key, value in report.items()})
    tracker.log_params({"data_source_sha256": digest})
    lengths = np.array([len(s) for s in interactions.sequences], dtype=np.int64)
    features = {"user": np.repeat(np.arange(1, len(lengths) + 1), lengths),
                "item": np.concatenate(interactions.sequences)}
    if interactions.timestamps is not None:
        features["timestamp"] = np.concatenate(interactions.timestamps)
    tracker.log_dataset(features, name=Path(spec.path).name, digest=digest[:16], context="training")


def fit(cfg, device: torch.device, out_dir: Path, log_metrics: Callable[..., None],
        on_data: Callable[[Interactions], None] | None = None) -> tuple[Path, dict[str, float]]:
    """Trains cfg.model on cfg.data as cfg.train says -> (the checkpoint in out_dir, its test metrics). Also what
    pipeline.bench.quality trains with; log_metrics(metrics, step=epoch) receives the per-epoch numbers;
    on_data(interactions) is called once the dataset is read."""
    # TF32 as the reference trains (on CUDA), for training only: the later stages measure fp32 variants,
    # gated on score error, in true fp32.
    with _tf32_matmul(device.type == "cuda"):
        return _fit(cfg, device, out_dir, log_metrics, on_data)


@contextmanager
def _tf32_matmul(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA matmuls while inside (when enabled), then the setting exactly as it was, through the API
    that reads it: restoring allow_tf32=False would turn torch's default fp32 precision "none" into "ieee",
    which Inductor keys its cache on, so graphs compiled after training in one process (stage=all) would never
    be found by another (validate from_run, the serving engine)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)  # torch >= 2.9
    saved = matmul.allow_tf32 if precision is None else precision
    try:
        if enabled:
            if precision is None:
                matmul.allow_tf32 = True
            else:
                matmul.fp32_precision = "tf32"
        yield
    finally:
        if precision is None:
            matmul.allow_tf32 = saved
        else:
            matmul.fp32_precision = saved


def _fit(cfg, device: torch.device, out_dir: Path, log_metrics: Callable[..., None],
         on_data: Callable[[Interactions], None] | None = None) -> tuple[Path, dict[str, float]]:
    tcfg = cfg.train
    if tcfg.negatives not in ("shared", "per_position"):
        raise PipelineError(f"unknown train.negatives '{tcfg.negatives}'; valid choices: shared, per_position")
    if tcfg.fit not in FITS:
        raise PipelineError(f"unknown train.fit '{tcfg.fit}'; valid choices: {', '.join(FITS)}")
    if tcfg.fit == "all_but_test" and tcfg.refit:
        raise PipelineError("train.refit=true needs train.fit=holdout: with all_but_test there is no epoch count to choose")
    interactions = load_interactions(cfg.data)
    if on_data is not None:
        on_data(interactions)
    splits = leave_one_out(interactions, cfg.model.max_len)
    log_metrics(
        {"num_users": splits.test.target.shape[0], "num_items": splits.num_items, "num_train_users": splits.train.items.shape[0]}
    )
    model = build_model(cfg.model, splits.num_items).to(device)
    retriever = Retriever(model, k=10, l2_norm=cfg.model.l2_norm)
    optimizer = _optimizer(model, tcfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    holdout = tcfg.fit == "holdout"
    train_sequences = splits.train if holdout else train_with_validation(splits)
    best = {"hr10": -1.0, "epoch": 0, "state": None}
    passes_without_gain = 0
    start = time.perf_counter()

    with cpu_threads(tcfg.num_threads if device.type == "cpu" else None):
        epochs = tqdm(range(1, tcfg.epochs + 1), desc="train", unit="epoch")
        for epoch in epochs:
            loss = _train_epoch(model, optimizer, train_sequences, cfg, device, gen)
            metrics = {"train_loss": loss}
            if holdout and (epoch % tcfg.eval_every == 0 or epoch == tcfg.epochs):
                model.eval()
                valid = evaluate_full_ranking(retriever.score_all, splits.valid, [10], tcfg.eval_batch_size, device)
                metrics["valid_hr10"], metrics["valid_ndcg10"] = valid["hr10"], valid["ndcg10"]
                if valid["hr10"] > best["hr10"]:
                    best = {"hr10": valid["hr10"], "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
                    passes_without_gain = 0
                else:
                    passes_without_gain += 1
            log_metrics(metrics, step=epoch)
            epochs.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()})
            if passes_without_gain >= tcfg.patience:
                log.info("early stop at epoch %d: no validation HR@10 gain in %d passes", epoch, tcfg.patience)
                break
            if tcfg.max_minutes and time.perf_counter() - start > 60 * tcfg.max_minutes and (best["state"] is not None or not holdout):
                log.info("stop at epoch %d: train.max_minutes=%s reached", epoch, tcfg.max_minutes)
                break
        train_seconds = time.perf_counter() - start

        if not holdout:
            best["epoch"] = epoch
        else:
            model.load_state_dict(best["state"])
        model.eval()
        ks = list(tcfg.ks)
        valid = {}
        if holdout:
            valid = evaluate_full_ranking(retriever.score_all, splits.valid, ks, tcfg.eval_batch_size, device, "valid")
        if tcfg.refit:
            model = _refit(cfg, device, splits, best["epoch"], gen, log_metrics)
            retriever = Retriever(model, k=10, l2_norm=cfg.model.l2_norm)
        test = evaluate_full_ranking(retriever.score_all, splits.test, ks, tcfg.eval_batch_size, device, "test")

    metrics = {**test, **{f"valid_{k}": v for k, v in valid.items()}}
    metrics.update(best_epoch=best["epoch"], epochs_run=epoch, train_seconds=train_seconds)
    log.info("test %s", ", ".join(f"{k}={v:.4f}" for k, v in test.items()))

    checkpoint = save_checkpoint(
        Path(out_dir) / "model.pt",
        model,
        OmegaConf.to_container(cfg.model, resolve=True),
        splits.num_items,
        extra={"data": OmegaConf.to_container(cfg.data, resolve=True), "metrics": metrics},
    )
    return checkpoint, metrics


def _refit(cfg, device: torch.device, splits, epochs: int, gen: torch.Generator, log_metrics: Callable[..., None]):
    """A fresh model trained on train+valid for the epoch count chosen on validation."""
    log.info("refit on train+valid for %d epochs (chosen on validation)", epochs)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, splits.num_items).to(device)
    optimizer = _optimizer(model, cfg.train)
    sequences = train_with_validation(splits)
    for epoch in tqdm(range(1, epochs + 1), desc="refit", unit="epoch"):
        log_metrics({"refit_train_loss": _train_epoch(model, optimizer, sequences, cfg, device, gen)}, step=epoch)
    return model.eval()


def _optimizer(model: torch.nn.Module, tcfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=tuple(tcfg.betas))


def _train_epoch(model, optimizer, train: TrainSequences, cfg, device, gen: torch.Generator) -> float:
    tcfg = cfg.train
    return train_epoch(
        model, optimizer, train, batch_size=tcfg.batch_size, num_negatives=tcfg.num_negatives,
        temperature=cfg.model.temperature, l2_norm=cfg.model.l2_norm, per_position=tcfg.negatives == "per_position",
        device=device, gen=gen,
    )
