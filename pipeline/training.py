"""One epoch of next-item training with sampled softmax: the loop of the train stage (pipeline.stages.train.fit,
which pipeline.bench.quality trains with too), with plain arguments instead of a config object."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.data import TrainSequences
from pipeline.models import sampled_softmax_loss


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: TrainSequences,
    *,
    batch_size: int,
    num_negatives: int,
    temperature: float,
    l2_norm: bool,
    per_position: bool,
    device: torch.device,
    gen: torch.Generator,
) -> float:
    """-> the mean loss. Each row predicts its items 2..n from the ones before; batches in gen's order."""
    model.train()
    order = torch.randperm(train.items.shape[0], generator=gen)
    total, steps = 0.0, 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        lengths = train.lengths[idx]
        # Trim the shared right padding: training is eager, so a shorter batch is just faster.
        width = int(lengths.max())
        items = train.items[idx, :width].to(device)
        input_lengths = (lengths - 1).to(device)
        positions = torch.arange(width - 1, device=device)
        inputs = items[:, :-1] * (positions < input_lengths[:, None])
        labels = items[:, 1:] * (positions < input_lengths[:, None])
        ts = None if train.timestamps is None else train.timestamps[idx, : width - 1].to(device)
        seq = model(inputs, input_lengths, ts)
        loss = sampled_softmax_loss(
            seq, labels, model.item_embeddings(), num_negatives, temperature, l2_norm,
            generator=gen if device.type == "cpu" else None, per_position=per_position,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
        steps += 1
    return total / max(steps, 1)
