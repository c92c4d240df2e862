"""Standard workloads: a random-initialized HSTU retriever of a fixed size and inputs for it. Quality is
not the point; the shapes are."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.models import HSTU, Retriever


@dataclass(frozen=True)
class Workload:
    name: str
    num_items: int
    max_len: int       # history length; every history is full
    dim: int
    num_layers: int
    num_heads: int
    top_k: int
    batch_sizes: tuple[int, ...]

    def retriever(self, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Retriever:
        torch.manual_seed(seed)
        model = HSTU(self.num_items, self.max_len, dim=self.dim, num_layers=self.num_layers,
                     num_heads=self.num_heads, dropout=0.0, linear_dropout=0.0)
        return Retriever(model, k=self.top_k).to(device=device, dtype=dtype).eval()

    def inputs(self, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (history [batch, max_len] of random item ids, lengths [batch] = max_len)."""
        gen = torch.Generator().manual_seed(seed)
        history = torch.randint(1, self.num_items + 1, (batch, self.max_len), generator=gen)
        return history.to(device), torch.full((batch,), self.max_len, device=device)

    def table_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of the item table; int8 tables carry an fp32 scale per row."""
        scales = 4 * (self.num_items + 1) if dtype == torch.int8 else 0
        return (self.num_items + 1) * self.dim * torch.empty((), dtype=dtype).element_size() + scales

    def flops(self, batch: int) -> float:
        """Multiply-adds x 2 of one call: the encoder over all positions (causal attention counted once)
        and scoring every item. (An upper bound: the last layer needs its last position only.)"""
        L, D, H = self.max_len, self.dim, self.num_heads
        head = D // H
        per_layer = 2 * L * D * (4 * H * head) + 2 * H * (L * (L + 1) / 2) * 2 * head + 2 * L * H * head * D
        return batch * (self.num_layers * per_layer + 2 * (self.num_items + 1) * D)


WORKLOADS = {
    # DESIGN.md: the standard workload, for GPUs.
    "retrieval-1m": Workload("retrieval-1m", 1_000_000, 200, 256, 4, 4, 100, (1, 16, 128, 1024)),
    # The same model family at a size a 2-core CPU measures in a minute or two.
    "retrieval-cpu": Workload("retrieval-cpu", 50_000, 50, 64, 2, 2, 100, (1, 16, 128)),
}
