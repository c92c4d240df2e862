"""HSTU and SASRec in plain PyTorch, the retrieval head (score, filter history, top-K) and the loss."""

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from pipeline.models.hstu import HSTU
from pipeline.models.loss import sampled_softmax_loss
from pipeline.models.retrieval import Retriever, l2_normalize, last_position, mask_history, top_k
from pipeline.models.sasrec import SASRec

MODELS: dict[str, type[nn.Module]] = {"hstu": HSTU, "sasrec": SASRec}
# Keys of the model config group read elsewhere (the retrieval head, the loss), not by the encoder.
SHARED_KEYS = frozenset({"name", "max_len", "l2_norm", "temperature"})

__all__ = [
    "HSTU",
    "MODELS",
    "Retriever",
    "SASRec",
    "build_model",
    "l2_normalize",
    "last_position",
    "mask_history",
    "sampled_softmax_loss",
    "top_k",
]


def build_model(cfg: Any, num_items: int) -> nn.Module:
    """The encoder named by cfg.name, built from the keys of the model config group."""
    options = dict(cfg) if isinstance(cfg, Mapping) else dict(vars(cfg))
    for key in ("name", "max_len"):
        if options.get(key) is None:
            raise ValueError(f"model config needs `{key}` (e.g. model.{key}=...)")
    name = options["name"]
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    model_cls = MODELS[name]
    accepted = set(inspect.signature(model_cls).parameters) - {"num_items", "max_len"}
    unknown = sorted(set(options) - accepted - SHARED_KEYS)
    if unknown:
        raise ValueError(
            f"model {name!r} does not take {', '.join(unknown)}; its options are "
            f"{', '.join(sorted(accepted | SHARED_KEYS))}"
        )
    kwargs = {key: value for key, value in options.items() if key in accepted}
    return model_cls(num_items=num_items, max_len=options["max_len"], **kwargs)
