"""PyTorch INT8 on the CPU: torch.export -> torchao's PT2E prepare with the X86 Inductor quantizer (static
per-tensor uint8 activations with HistogramObserver, per-channel int8 weights) -> calibration on the
calibration set -> convert -> torch.compile (Inductor with freezing, which lowers the quantize/dequantize
patterns to oneDNN int8 kernels).

The variant's artifact is a folder: the checkpoint and the calibration cache (each activation observer's
range, scale and zero point). Loading rebuilds the same quantized graph from them without calibrating:
the compiled module itself cannot be saved (an exported .pt2 of the converted graph fails Inductor's
freezing in torch 2.13: `onednn.qlinear_prepack` has no fake implementation for lifted weights).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.core import PipelineError, Variant, file_digest
from pipeline.export import ShapeRange, example_inputs, export_program, input_names, max_history
from pipeline.integrity import copy_verified, write_digest
from pipeline.quant.calibration import CalibrationCache, CalibrationSet

log = logging.getLogger(__name__)

KIND = "torchao_pt2e"
METHOD = "histogram"  # the X86 Inductor quantizer's activation observer
CHECKPOINT, CACHE = "retriever.ckpt", "calibration.json"
TESTED = "torchao 0.18 with torch 2.13 (CPU)"


def unavailable_reason() -> str | None:
    """Why the torchao path cannot run here, or None."""
    logging.getLogger("torchao").setLevel(logging.ERROR)  # it warns about CUDA-only libraries on a CPU build
    try:
        import torchao
    except ImportError:
        return "torchao is not installed (pip install -e '.[int8]'; tested: " + TESTED + ")"
    try:
        _imports()
    except ImportError as err:
        return f"torchao {torchao.__version__} has no PT2E X86 Inductor quantizer where expected ({err}); tested: {TESTED}"
    return None


def _imports():
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    return prepare_pt2e, convert_pt2e, xiq


def prepare(retriever: torch.nn.Module) -> torch.fx.GraphModule:
    """The retriever exported (dynamic batch, history up to max_len) with observers inserted."""
    prepare_pt2e, _, xiq = _imports()
    length = max_history(retriever)
    program = export_program(retriever, ShapeRange(1, 2, None), ShapeRange(1, length, length), torch.device("cpu"))
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    return prepare_pt2e(program.module(), quantizer)


def _activation_observers(prepared: torch.fx.GraphModule) -> dict[str, torch.nn.Module]:
    """Per-tensor observers (activations); per-channel ones observe the weights."""
    return {name: mod for name, mod in prepared.named_children()
            if name.startswith("activation_post_process") and "PerChannel" not in type(mod).__name__}


@torch.no_grad()
def calibrate(prepared: torch.fx.GraphModule, calib: CalibrationSet, names: list[str], batch_size: int) -> None:
    for batch in calib.batches(batch_size):
        prepared(*[batch[n] for n in names])


def observed(prepared: torch.fx.GraphModule) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """-> ({observer: [min, max]}, {observer: [scale, zero_point]}) of the activation observers."""
    ranges, qparams = {}, {}
    for name, obs in _activation_observers(prepared).items():
        if obs.min_val.numel() != 1 or not torch.isfinite(obs.min_val):
            raise PipelineError(f"torchao observer {name} saw no data: the calibration set never reached it")
        scale, zero_point = obs.calculate_qparams()
        ranges[name] = [float(obs.min_val), float(obs.max_val)]
        qparams[name] = [float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0])]
    return ranges, qparams


@torch.no_grad()
def apply_cache(prepared: torch.fx.GraphModule, retriever: torch.nn.Module, cache: CalibrationCache) -> None:
    """Gives every activation observer the cached scale and zero point instead of calibrating. One forward
    pass on a fixed example fills the weight observers (weights are constants, so their qparams are too)."""
    observers = _activation_observers(prepared)
    qparams = cache.extra.get("qparams", {})
    if set(observers) != set(qparams):
        raise PipelineError(f"the calibration cache has {len(qparams)} activation observers, the quantized graph "
                            f"{len(observers)}: it was made for another graph; calibrate again (int8.calibration.cache=auto)")
    prepared(*example_inputs(retriever, 2, max_history(retriever), torch.device("cpu")))
    for name, obs in observers.items():
        scale, zero_point = qparams[name]
        fixed = (torch.tensor([scale], dtype=torch.float32), torch.tensor([int(zero_point)], dtype=torch.int32))
        obs.calculate_qparams = lambda fixed=fixed: fixed


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    _, convert_pt2e, _ = _imports()
    return convert_pt2e(prepared)


class TorchaoRetriever:
    """The converted int8 graph under torch.compile (Inductor, freezing on while it compiles), called like
    every variant. It runs on the CPU whatever device the inputs are on."""

    def __init__(self, quantized: torch.fx.GraphModule, names: list[str]) -> None:
        self.names = names
        self.compiled = torch.compile(quantized, dynamic=True)

    @torch.no_grad()
    def __call__(self, history, lengths, timestamps=None):
        given = {"history": history, "lengths": lengths, "timestamps": timestamps}
        from torch._inductor import config as inductor_config

        # Freezing folds the int8 weights into oneDNN's packed form; it must be on while a call compiles.
        with inductor_config.patch(freezing=True):
            return self.compiled(*[given[n].cpu() for n in self.names])


def build(checkpoint: str, top_k: int, calib: CalibrationSet, batch_size: int,
          cache: CalibrationCache | None) -> tuple[torch.fx.GraphModule, CalibrationCache, list[str]]:
    """-> (the converted graph, its calibration cache, its input names). With a cache (already checked
    against this checkpoint and calibration set), nothing is calibrated."""
    from pipeline.variants import build_retriever

    retriever = build_retriever(checkpoint, top_k, "fp32", torch.device("cpu"))
    names = input_names(retriever)
    prepared = prepare(retriever)
    if cache is None:
        calibrate(prepared, calib, names, batch_size)
        ranges, qparams = observed(prepared)
        cache = CalibrationCache(KIND, METHOD, file_digest([Path(checkpoint)]), calib.digest, calib.size, calib.seed,
                                 ranges, extra={"qparams": qparams})
    else:
        apply_cache(prepared, retriever, cache)
    return convert(prepared), cache, names


def write_variant_dir(out_dir: Path, checkpoint: str, cache: CalibrationCache) -> Path:
    """The variant's folder: the checkpoint it quantizes and the calibration cache that fixes its ranges."""
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_verified(checkpoint, out_dir / CHECKPOINT)
    cache.save(out_dir / CACHE)
    write_digest(out_dir)
    return out_dir


def load_torchao_variant(variant: Variant, device: torch.device, top_k: int) -> TorchaoRetriever:
    from pipeline.variants import build_retriever

    reason = unavailable_reason()
    if reason:
        raise PipelineError(f"{variant.name} needs torchao: {reason}")
    if variant.options.get("top_k") != top_k:
        raise PipelineError(f"{variant.name} was quantized with top_k={variant.options.get('top_k')} but {top_k} "
                            f"was asked; run stage=int8 again with int8.top_k={top_k}")
    folder = Path(variant.artifact)
    checkpoint = folder / CHECKPOINT
    cache = CalibrationCache.load(folder / CACHE)
    cache.check(kind=KIND, model_digest=file_digest([checkpoint]), data_digest=cache.data_digest, method=METHOD,
                source=str(folder / CACHE))
    retriever = build_retriever(str(checkpoint), top_k, "fp32", torch.device("cpu"))
    prepared = prepare(retriever)
    apply_cache(prepared, retriever, cache)
    return TorchaoRetriever(convert(prepared), input_names(retriever))
