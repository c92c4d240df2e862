"""The stage registry: name -> run(ctx) -> StageResult. Later stages add themselves to _MODULES.

A stage's module is imported when the stage runs, not when the registry is read: a refused config answers
at once, and `stage=[train,validate]` runs on a host without the deploy stage's tritonclient or the onnx
stage's exporter.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Callable

_MODULES = {
    "train": "pipeline.stages.train",
    "compile": "pipeline.stages.compile",
    "trt": "pipeline.stages.trt",
    "onnx": "pipeline.stages.onnx",
    "int8": "pipeline.stages.int8",
    "validate": "pipeline.stages.validate",
    "promote": "pipeline.stages.promote",
    "deploy": "pipeline.stages.deploy",
}


class _Registry(Mapping[str, Callable]):
    def __init__(self, modules: dict[str, str]) -> None:
        self._modules = modules

    def __getitem__(self, name: str) -> Callable:
        return importlib.import_module(self._modules[name]).run

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


STAGES: Mapping[str, Callable] = _Registry(_MODULES)
