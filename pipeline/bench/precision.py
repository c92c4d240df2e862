"""Where a 16-bit variant loses top-K overlap with fp32 eager: the encoder's 16-bit arithmetic, or the
16-bit item table the scoring reads.

Each row keeps one half of the retriever in fp32 and the other in 16 bits, scores with fp32 accumulation
(as the fused top-K kernel does), and reports the top-K overlap with the all-fp32 answer on the same users.
It runs anywhere (the CPU emulates bf16/fp16 arithmetic); the rounding of the inputs is the same as on a
GPU, the order of the sums is not.

    python -m pipeline.bench.precision                          # retrieval-1m, 32 users, bf16
    python -m pipeline.bench.precision --dtype fp16 --users 64
"""
from __future__ import annotations

import argparse

import torch
from torch import Tensor

from pipeline.bench.workload import WORKLOADS, Workload
from pipeline.catalogue import DTYPES

HALF = sorted(name for name, dtype in DTYPES.items() if dtype.itemsize == 2)  # the 16-bit precisions


def _top_k(query: Tensor, table: Tensor, history: Tensor, k: int) -> Tensor:
    """Top-k ids by fp32-accumulated scores of the given (possibly rounded) query and table, history and
    column 0 filtered, as the fused kernel ranks them."""
    scores = query.float() @ table.float().T
    scores[:, 0] = float("-inf")
    scores.scatter_(1, history, float("-inf"))
    return scores.topk(k, dim=1).indices


def overlap(ids: Tensor, reference: Tensor) -> float:
    """Mean fraction of each row's reference ids that ids also holds."""
    return (ids[:, :, None] == reference[:, None, :]).any(-1).float().mean().item()


@torch.no_grad()
def study(workload: Workload, users: int, dtype: torch.dtype, device: torch.device,
          seed: int = 0) -> dict[str, float]:
    """-> {case: top-K overlap with the all-fp32 answer}."""
    history, lengths = workload.inputs(users, device, seed=seed + 1)
    full = workload.retriever(device, torch.float32, seed=seed)
    half = workload.retriever(device, dtype, seed=seed)
    q32, t32 = full.query(history, lengths).float(), full.table(torch.float32).float()
    q16, t16 = half.query(history, lengths), half.table(dtype)
    k = workload.top_k
    reference = _top_k(q32, t32, history, k)
    eager_scores = q16 @ t16.T  # the eager 16-bit variant: scores rounded to 16 bits before the top-K
    eager_scores[:, 0] = float("-inf")
    eager_scores.scatter_(1, history, float("-inf"))
    return {
        "fp32 encoder, fp32 table (the reference against itself)": overlap(_top_k(q32, t32, history, k), reference),
        "fp32 encoder and query, 16-bit table": overlap(_top_k(q32, t16, history, k), reference),
        "fp32 encoder, query rounded to 16 bits, 16-bit table": overlap(_top_k(q32.to(dtype), t16, history, k), reference),
        "16-bit encoder, fp32 table (an exact re-rank's best)": overlap(_top_k(q16, t32, history, k), reference),
        "16-bit encoder, 16-bit table (the fused kernel's arithmetic)": overlap(_top_k(q16, t16, history, k), reference),
        "eager 16-bit (scores rounded to 16 bits)": overlap(eager_scores.topk(k, dim=1).indices, reference),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="retrieval-1m")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--dtype", choices=HALF, default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.users < 1:
        parser.error(f"--users must be at least 1, got {args.users}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workload = WORKLOADS[args.workload]
    results = study(workload, args.users, DTYPES[args.dtype], device, args.seed)
    print(f"{workload.name}, {args.users} users, {args.dtype}, {device.type}: top-{workload.top_k} overlap with fp32\n")
    print("| case | overlap |\n| --- | --- |")
    for case, value in results.items():
        print(f"| {case} | {value:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
