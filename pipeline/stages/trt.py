"""trt: Torch-TensorRT variants of the retriever through the dynamo path. The exported program (dynamic
batch and history length) is compiled for the configured shape ranges; a dry run reports which ops run in
TensorRT and which fall back to PyTorch; the compiled program is saved for torch_tensorrt.load, and the
whole graph is also serialized as one engine with its config.pbtxt for Triton's tensorrt_plan backend.
fp32 always, plus the target precision (fp16, bf16); a precision that fails to build, load or pass its
parity check is recorded as failed and left out. Without CUDA or torch_tensorrt the stage cannot run:
skipped in stage=all, exit 2 by name, the reason in both cases.

This stage has never run on hardware (no TensorRT is reachable from this project's machines); the
README says how a user with TensorRT verifies it.
"""
from __future__ import annotations

import copy
import logging
import time

from pipeline.bench.parity import check_parity, load_reference
from pipeline.core import Context, PipelineError, StageResult, StageUnavailable, Variant, build_variant
from pipeline.export import example_inputs, export_program, input_names
from pipeline.export.trt import (
    compile_settings,
    coverage,
    dry_run,
    engine_io,
    input_specs,
    load_trt_variant,
    plan_config,
    save_program,
    shape_ranges,
    unavailable_reason,
    unsupported_ops,
    write_plan_model,
)
from pipeline.gates import gate_for
from pipeline.variants import build_retriever

log = logging.getLogger(__name__)

REDUCED = ("fp16", "bf16")


def run(ctx: Context) -> StageResult:
    tcfg, device = ctx.cfg.trt, ctx.device
    batch, history = shape_ranges(tcfg, ctx.cfg.model.max_len)
    _check_batches(ctx.cfg, batch.max)
    reason = unavailable_reason(device)
    if reason:
        raise StageUnavailable(reason)
    import torch_tensorrt

    checkpoint = str(ctx.require_artifact("checkpoint"))
    if ctx.cfg.precision == "int8":
        log.info("precision=int8: INT8 variants come from the int8 stage (calibration); compiling fp32 only")
    precisions = ["fp32", *([ctx.cfg.precision] if ctx.cfg.precision in REDUCED else [])]
    sample, reference = load_reference(ctx.cfg, ctx.require_artifact("reference_answer"), checkpoint, tcfg.top_k)
    out_dir = ctx.run_dir / "trt"
    out_dir.mkdir(parents=True, exist_ok=True)

    metrics, variants, failures = {}, [], {}
    for precision in precisions:
        name = f"tensorrt-{precision}"

        def trt_variant() -> Variant:
            retriever = build_retriever(checkpoint, tcfg.top_k, precision, device)
            names = input_names(retriever)
            program = export_program(retriever, batch, history, device)
            inputs = [torch_tensorrt.Input(**spec) for spec in input_specs(names, batch, history)]
            settings = compile_settings(tcfg, precision, device)

            # torch_tensorrt lowers a program's graph in place: each of its three calls gets its own copy.
            report = dry_run(torch_tensorrt.dynamo.compile, copy.deepcopy(program), inputs, settings)
            (out_dir / f"coverage-{precision}.txt").write_text(report)
            ops = coverage(report)
            if settings["require_full_compilation"] and ops["trt_ops_supported"] < ops["trt_ops_total"]:
                raise PipelineError(
                    f"{name}: trt.require_full_compilation=true but these ops fall back to PyTorch: "
                    f"{', '.join(unsupported_ops(report)) or 'see coverage-' + precision + '.txt'}"
                )

            start = time.perf_counter()
            compiled = torch_tensorrt.dynamo.compile(copy.deepcopy(program), arg_inputs=inputs, **settings)
            build_seconds = time.perf_counter() - start
            example = example_inputs(retriever, max(batch.opt, 2), max(history.opt, 2), device)  # as export_program
            path = save_program(compiled, out_dir / f"retriever-{precision}.ep", example, names, batch, history)

            plan = _serialized_engine(torch_tensorrt, program, inputs, settings, name)
            model_name = f"{tcfg.triton.model_name}_{precision}"
            model_dir = write_plan_model(out_dir / "triton", model_name, plan,
                                         plan_config(model_name, engine_io(plan), tcfg.triton))

            variant = Variant(name, "tensorrt", precision, str(path), "trt", options={
                "top_k": tcfg.top_k, "inputs": names, "history_max": history.max,
                "batch_range": [batch.min, batch.opt, batch.max], "history_range": [history.min, history.opt, history.max],
                "triton_model": str(model_dir),
            })
            agreement = check_parity(name, load_trt_variant(variant, device, tcfg.top_k), reference, sample,
                                     gate_for(ctx.cfg.gates, precision), ctx.cfg.gates.sample.batch_size, device)
            metrics.update({f"{key}_{precision}": value for key, value in {**ops, **agreement}.items()})
            metrics.update({f"trt_build_seconds_{precision}": build_seconds, f"trt_engine_mb_{precision}": len(plan) / 2**20})
            log.info("%s: %d of %d ops in %d TensorRT engine(s), built in %.1f s; top-K overlap %.4f",
                     name, ops["trt_ops_supported"], ops["trt_ops_total"], ops["trt_engines"], build_seconds,
                     agreement["parity_topk_overlap"])
            return variant

        variant = build_variant(ctx, name, failures, trt_variant)
        if variant is not None:
            variants.append(variant)

    metrics["num_variants"] = len(variants)
    return StageResult(metrics=metrics, artifacts={"trt_dir": str(out_dir)}, variants=variants, failures=failures)


def _check_batches(cfg, batch_max: int) -> None:
    """Every batch validate and the parity check send must fit the engines (before minutes of building)."""
    largest = max([*cfg.validate.batch_sizes, cfg.validate.eval_batch_size, cfg.gates.sample.batch_size])
    if largest > batch_max:
        raise PipelineError(f"batches of {largest} are measured but trt.batch.max={batch_max}; raise trt.batch.max")
    if cfg.trt.triton.max_batch_size > batch_max:
        raise PipelineError(
            f"trt.triton.max_batch_size={cfg.trt.triton.max_batch_size} exceeds the engine's trt.batch.max={batch_max}"
        )


def _serialized_engine(torch_tensorrt, program, inputs, settings, name: str) -> bytes:
    """The whole graph as one TensorRT engine, for Triton's tensorrt_plan backend."""
    try:
        plan = torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine(
            program, arg_inputs=inputs, **settings
        )
    except Exception as err:  # torch_tensorrt logs the cause and raises whatever follows from it
        raise PipelineError(
            f"{name}: the graph does not convert into a single TensorRT engine ({type(err).__name__}: {err}); "
            "the coverage report lists the ops that fall back to PyTorch"
        ) from err
    if not plan:
        raise PipelineError(f"{name}: TensorRT returned an empty engine")
    return bytes(plan)
