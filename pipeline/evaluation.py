"""Ranking quality: full ranking over all items (train stage) and from top-K answers (any variant)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from pipeline.data import Split

Predict = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def ranking_metrics(ranks: torch.Tensor, ks: Iterable[int]) -> dict[str, float]:
    """ranks: 0-based rank of each target among the candidates. HR@k and NDCG@k (one relevant item)."""
    ranks = ranks.double()
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hr{k}"] = hit.double().mean().item()
        out[f"ndcg{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), torch.zeros_like(ranks)).mean().item()
    return out


def target_ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rank of the target = number of items scored strictly higher (ties count in the target's favour)."""
    target_score = scores.gather(1, target[:, None])
    return (scores > target_score).sum(dim=1)


def _batches(split: Split, batch_size: int, device: torch.device, desc: str | None):
    n = split.target.shape[0]
    for start in tqdm(range(0, n, batch_size), desc=desc, leave=False, disable=desc is None):
        sl = slice(start, start + batch_size)
        ts = None if split.timestamps is None else split.timestamps[sl].to(device)
        yield sl, split.history[sl].to(device), split.lengths[sl].to(device), ts


@torch.no_grad()
def evaluate_full_ranking(
    score_all: Callable, split: Split, ks: Iterable[int], batch_size: int, device: torch.device, desc: str | None = None
) -> dict[str, float]:
    """score_all(history, lengths, timestamps) -> [B, N+1] scores with seen items already at -inf."""
    ranks = []
    for sl, history, lengths, ts in _batches(split, batch_size, device, desc):
        scores = score_all(history, lengths, ts).float()
        ranks.append(target_ranks(scores, split.target[sl].to(device)).cpu())
    return ranking_metrics(torch.cat(ranks), ks)


@torch.no_grad()
def predict_top_k(
    predict: Predict, split: Split, batch_size: int, device: torch.device, desc: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a variant over a split -> (item ids [U, K], scores [U, K]) on the CPU.

    Every call has `batch_size` rows (or the split's size when smaller): a partial last batch is padded with
    copies of its last row and the padding's answers dropped. Rows are independent, so the answer is the same;
    a shape-specialized variant (max-autotune, a captured CUDA graph, a fixed-shape engine) is then not built
    again for one leftover shape."""
    ids, scores = [], []
    rows = min(batch_size, split.target.shape[0])
    for _, history, lengths, ts in _batches(split, batch_size, device, desc):
        real = history.shape[0]
        if real < rows:
            history, lengths = _pad_rows(history, rows), _pad_rows(lengths, rows)
            ts = None if ts is None else _pad_rows(ts, rows)
        batch_ids, batch_scores = predict(history, lengths, ts)
        ids.append(batch_ids[:real].cpu())
        scores.append(batch_scores[:real].float().cpu())
    return torch.cat(ids), torch.cat(scores)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([x, x[-1:].expand(rows - x.shape[0], *x.shape[1:])])


def top_k_metrics(ids: torch.Tensor, target: torch.Tensor, ks: Iterable[int]) -> dict[str, float]:
    """HR/NDCG@k from a top-K answer (k <= K); a target outside the answer counts as a miss."""
    k_max = ids.shape[1]
    ks = [k for k in ks if k <= k_max]
    match = ids == target[:, None]
    ranks = torch.where(match.any(dim=1), match.int().argmax(dim=1), torch.full_like(target, k_max))
    return ranking_metrics(ranks, ks)


def parity(ids: torch.Tensor, scores: torch.Tensor, ref_ids: torch.Tensor, ref_scores: torch.Tensor) -> dict[str, float]:
    """Agreement of a variant with the fp32 reference on the same inputs."""
    k = ids.shape[1]
    overlap = (ids[:, :, None] == ref_ids[:, None, :]).any(dim=2).float().sum(dim=1) / k
    a, b = scores.double(), ref_scores.double()
    # Filtered slots are -inf in both when K exceeds the unseen items; they agree, not differ.
    err = torch.where(a == b, torch.zeros_like(a), (a - b).abs())
    return {
        "parity_topk_overlap": overlap.mean().item(),
        "parity_topk_overlap_min": overlap.min().item(),
        "parity_max_abs_err": err.max().item(),
        "parity_top1_agreement": (ids[:, 0] == ref_ids[:, 0]).float().mean().item(),
    }
