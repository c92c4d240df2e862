"""The trt stage without TensorRT: shape ranges and compile settings from the config, the dry-run report,
the Triton tensorrt_plan model (layout and config.pbtxt), and the skip / exit-2 paths with their reason.
Compiling and running engines needs TensorRT on a GPU: see the README ("onnx and trt stages")."""
import sys

import pytest
import torch
from google.protobuf import text_format
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tritonclient.grpc import model_config_pb2 as pb

import pipeline.__main__  # noqa: F401  (registers the ${project_root:} resolver the configs use)
from conftest import ROOT, TINY, run_pipeline, seed_store
from pipeline.bench.parity import save_reference
from pipeline.checkpoint import save_checkpoint
from pipeline.core import Context, Manifest, PipelineError, StageResult, StageUnavailable, Variant
from pipeline.data import load_splits
from pipeline.export import ShapeRange
from pipeline.export.trt import (
    EngineTensor,
    compile_settings,
    coverage,
    dry_run,
    input_specs,
    load_trt_variant,
    plan_config,
    resolve_op,
    shape_ranges,
    unavailable_reason,
    unsupported_ops,
    write_plan_model,
)
from pipeline.models import build_model
from pipeline.stages import trt as trt_stage

# Keyword parameters that both torch_tensorrt.dynamo.compile and
# convert_exported_program_to_serialized_trt_engine take in torch_tensorrt 2.11 and 2.13 (of those the
# stage might pass); enabled_precisions is left out on purpose: 2.13 removed it.
TORCH_TENSORRT_PARAMS = {
    "device", "disable_tf32", "min_block_size", "torch_executed_ops", "require_full_compilation",
    "cache_built_engines", "reuse_cached_engines", "engine_cache_dir", "timing_cache_path", "workspace_size",
    "optimization_level", "use_fp32_acc", "dryrun", "truncate_double", "version_compatible",
}

# The dry-run report as torch_tensorrt prints it (format of _DryRunTracker.dryrun_stats_display).
REPORT = """
++++++++++++++++++++++++++++++++++++++++++++++++++ Dry-Run Results for Graph ++++++++++++++++++++++++++++++++++++++++++++++++++

The graph consists of 120 Total Operators, of which 114 operators are supported, 95.0% coverage

The following ops are currently unsupported or excluded from conversion, and are listed with their op-count in the graph:
 torch.ops.aten.scatter.value: 1
torch.ops.aten.topk.default: 1

Compiled with: CompilationSettings(...)

  Graph Structure:

   Inputs: List[Tensor: (1, 16)@int64]
    ...
    TRT Engine #1 - Submodule name: _run_on_acc_0
     Engine Inputs: List[Tensor: (1, 16)@int64]
     Number of Operators in Engine: 100
     Engine Outputs: Tensor: (1, 64)@float32
    ...
    TRT Engine #2 - Submodule name: _run_on_acc_2
     Number of Operators in Engine: 14
    ...
   Outputs: List[Tensor: (1, 20)@int64, Tensor: (1, 20)@float32]
"""


def make_cfg(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["artifacts_dir=/tmp/genrec-trt-test", *overrides])


def test_shape_ranges_from_config():
    batch, history = shape_ranges(make_cfg("model.max_len=50").trt, 50)
    assert batch == ShapeRange(1, 16, 1024)
    assert history == ShapeRange(1, 50, 50)  # null -> model.max_len
    batch, history = shape_ranges(make_cfg("trt.batch={min:2,opt:8,max:64}", "trt.history.opt=20").trt, 50)
    assert (batch, history) == (ShapeRange(2, 8, 64), ShapeRange(1, 20, 50))


@pytest.mark.parametrize(
    "override,message",
    [("trt.batch.min=0", "trt.batch range"), ("trt.batch.opt=4096", "trt.batch range"),
     ("trt.history.max=80", "exceeds model.max_len=50"), ("trt.history.opt=60", "trt.history range")],
)
def test_bad_shape_ranges_are_refused(override, message):
    with pytest.raises(PipelineError, match=message):
        shape_ranges(make_cfg(override).trt, 50)


def test_input_specs_follow_the_ranges():
    batch, history = ShapeRange(1, 16, 1024), ShapeRange(1, 50, 200)
    specs = {s["name"]: s for s in input_specs(["history", "lengths", "timestamps"], batch, history)}
    assert specs["history"]["min_shape"] == (1, 1) and specs["history"]["opt_shape"] == (16, 50)
    assert specs["history"]["max_shape"] == (1024, 200) and specs["timestamps"]["max_shape"] == (1024, 200)
    assert specs["lengths"]["min_shape"] == (1,) and specs["lengths"]["max_shape"] == (1024,)
    assert all(s["dtype"] == torch.int64 for s in specs.values())
    assert [s["name"] for s in input_specs(["history", "lengths"], batch, history)] == ["history", "lengths"]


def test_compile_settings_translation():
    cfg = make_cfg("trt.torch_executed_ops=[aten.topk.default,torch.ops.aten.scatter.value]", "trt.optimization_level=5")
    fp16 = compile_settings(cfg.trt, "fp16", torch.device("cuda", 0))
    assert set(fp16) <= TORCH_TENSORRT_PARAMS
    assert fp16["torch_executed_ops"] == {torch.ops.aten.topk.default, torch.ops.aten.scatter.value}
    assert fp16["min_block_size"] == 5 and fp16["optimization_level"] == 5 and not fp16["require_full_compilation"]
    assert fp16["cache_built_engines"] and fp16["reuse_cached_engines"]
    assert fp16["engine_cache_dir"] == "/tmp/genrec-trt-test/trt_engine_cache"  # under artifacts_dir
    assert fp16["timing_cache_path"].startswith(fp16["engine_cache_dir"])
    assert fp16["use_fp32_acc"] and fp16["disable_tf32"] and fp16["device"] == torch.device("cuda", 0)
    fp32 = compile_settings(cfg.trt, "fp32", torch.device("cuda", 0))
    assert not fp32["use_fp32_acc"]  # fp32 accumulation is an fp16 setting
    assert not compile_settings(make_cfg("trt.engine_cache=false").trt, "fp32", torch.device("cuda"))["cache_built_engines"]


def test_compile_settings_refusals():
    with pytest.raises(PipelineError, match="aten.topk.default"):
        resolve_op("aten.topk")
    with pytest.raises(PipelineError, match="not an operator overload"):
        resolve_op("aten.no_such_op.default")
    cfg = make_cfg("trt.require_full_compilation=true", "trt.torch_executed_ops=[aten.topk.default]")
    with pytest.raises(PipelineError, match="require_full_compilation"):
        compile_settings(cfg.trt, "fp32", torch.device("cuda"))


def test_dry_run_captures_the_report_and_never_stops_at_a_fallback():
    calls = []

    def fake_compile(program, **kwargs):
        calls.append(kwargs)
        print(REPORT)

    report = dry_run(fake_compile, "program", ["inputs"], {"min_block_size": 5, "require_full_compilation": True})
    assert "Dry-Run Results" in report
    assert calls == [{"arg_inputs": ["inputs"], "min_block_size": 5, "require_full_compilation": False, "dryrun": True}]
    assert coverage(report) == {"trt_ops_total": 120, "trt_ops_supported": 114, "trt_op_coverage": 0.95, "trt_engines": 2}
    assert unsupported_ops(report) == ["torch.ops.aten.scatter.value", "torch.ops.aten.topk.default"]
    with pytest.raises(PipelineError, match="no coverage report"):
        coverage("nothing printed")


ENGINE = [
    EngineTensor("history", True, "TYPE_INT64", (-1, -1)),
    EngineTensor("lengths", True, "TYPE_INT64", (-1,)),
    EngineTensor("output0", False, "TYPE_INT64", (-1, 100)),
    EngineTensor("output1", False, "TYPE_FP16", (-1, 100)),
]


def test_plan_config_is_valid_triton_config(tmp_path):
    triton = make_cfg().trt.triton
    text = plan_config("retriever_trt_fp16", ENGINE, triton)
    config = text_format.Parse(text, pb.ModelConfig())
    assert config.name == "retriever_trt_fp16" and config.platform == "tensorrt_plan"
    assert config.max_batch_size == 1024 and config.default_model_filename == "model.plan"
    inputs, outputs = {i.name: i for i in config.input}, {o.name: o for o in config.output}
    assert list(inputs["history"].dims) == [-1] and inputs["history"].data_type == pb.TYPE_INT64
    # lengths is [B] for the engine: [1] for Triton, reshaped to []
    assert list(inputs["lengths"].dims) == [1] and inputs["lengths"].HasField("reshape")
    assert list(inputs["lengths"].reshape.shape) == [] and not inputs["history"].HasField("reshape")
    assert list(outputs["output0"].dims) == [100] and outputs["output1"].data_type == pb.TYPE_FP16
    assert list(config.dynamic_batching.preferred_batch_size) == [16, 128]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU and config.instance_group[0].count == 1

    model_dir = write_plan_model(tmp_path / "triton", "retriever_trt_fp16", b"engine bytes", text)
    assert (model_dir / "1" / "model.plan").read_bytes() == b"engine bytes"
    assert text_format.Parse((model_dir / "config.pbtxt").read_text(), pb.ModelConfig()) == config


def test_plan_config_needs_a_dynamic_batch_dimension():
    static = [EngineTensor("history", True, "TYPE_INT64", (8, 50))]
    with pytest.raises(PipelineError, match="dynamic dimension 0"):
        plan_config("m", static, make_cfg().trt.triton)


def test_unavailable_reason_names_what_is_missing(monkeypatch):
    reason = unavailable_reason(torch.device("cpu"))
    if torch.cuda.is_available():
        assert "device=cpu" in reason
    else:
        assert "no CUDA device" in reason
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert unavailable_reason(torch.device("cuda")) == (
        "TensorRT cannot run here: torch_tensorrt is not installed (pip install -e '.[trt]' on a CUDA host with TensorRT)"
    )


@pytest.mark.skipif(unavailable_reason(torch.device("cuda")) is None, reason="TensorRT is available here")
def test_stage_raises_unavailable_after_checking_its_config(tmp_path):
    cfg = make_cfg()
    ctx = Context(cfg=cfg, device=torch.device("cpu"), run_dir=tmp_path, manifest=Manifest(), tracker=None)
    with pytest.raises(StageUnavailable, match="TensorRT cannot run here"):
        trt_stage.run(ctx)
    bad = make_cfg("trt.batch.max=64")  # validate.eval_batch_size is 128
    with pytest.raises(PipelineError, match="raise trt.batch.max"):
        trt_stage.run(Context(cfg=bad, device=torch.device("cpu"), run_dir=tmp_path, manifest=Manifest(), tracker=None))
    variant = Variant("tensorrt-fp32", "tensorrt", "fp32", str(tmp_path / "x.ep"), "trt", {"top_k": 100})
    with pytest.raises(PipelineError, match="cannot load tensorrt-fp32: TensorRT cannot run here"):
        load_trt_variant(variant, torch.device("cpu"), 100)
    with pytest.raises(PipelineError, match="trt.top_k=20"):
        load_trt_variant(variant, torch.device("cpu"), 20)


@pytest.mark.skipif(unavailable_reason(torch.device("cuda")) is None, reason="TensorRT is available here")
def test_stage_by_name_exits_2_with_the_reason_in_mlflow(tmp_path, store_template):
    from mlflow import MlflowClient

    artifacts = seed_store(store_template, tmp_path / "artifacts").parent
    result = run_pipeline([*TINY, f"artifacts_dir={artifacts}", "stage=trt"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "TensorRT cannot run here" in output
    client = MlflowClient(f"sqlite:///{artifacts / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("genrec").experiment_id])}
    stage = runs["trt"].data.tags
    assert stage["status"] == "failed" and "TensorRT cannot run here" in stage["reason"]
    parent = next(r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FAILED" and parent.data.tags["status"] == "failed"


class StandInTorchTensorRT:
    """Just enough of torch_tensorrt's API, in PyTorch, to run the stage's wiring on a CPU: "compiling"
    returns the exported program's module, the "engine" is a few bytes, save/load go through torch.export."""

    def __init__(self):
        self.calls = []
        self.dynamo = self

    def Input(self, **spec):
        return spec

    def compile(self, program, arg_inputs, **settings):
        self.calls.append(("compile", settings))
        if settings.get("dryrun"):
            print(REPORT)
        return program.module()

    def convert_exported_program_to_serialized_trt_engine(self, program, arg_inputs, **settings):
        self.calls.append(("engine", settings))
        return b"serialized engine"

    def save(self, module, path, output_format, arg_inputs, dynamic_shapes, retrace):
        assert output_format == "exported_program" and retrace
        torch.export.save(torch.export.export(module, tuple(arg_inputs), dynamic_shapes=dynamic_shapes), path)

    def load(self, path):
        return torch.export.load(path)


@pytest.mark.slow
def test_stage_wiring_and_artifact_layout_with_a_stand_in_for_torch_tensorrt(tmp_path, monkeypatch):
    cfg = make_cfg(*TINY, "precision=fp16", "gates.fp16.min_topk_overlap=0.5", "trt.batch.max=256")
    stand_in = StandInTorchTensorRT()
    monkeypatch.setitem(sys.modules, "torch_tensorrt", stand_in)
    monkeypatch.setattr(trt_stage, "unavailable_reason", lambda device: None)
    monkeypatch.setattr("pipeline.export.trt.unavailable_reason", lambda device: None)
    monkeypatch.setattr(trt_stage, "engine_io", lambda plan: ENGINE)
    torch.manual_seed(0)
    model = build_model(cfg.model, load_splits(cfg).num_items).eval()
    checkpoint = save_checkpoint(tmp_path / "model.pt", model, OmegaConf.to_container(cfg.model), model.item_embeddings().size(0) - 1)
    manifest = Manifest()
    reference = save_reference(cfg, str(checkpoint), tmp_path / "reference_answer.pt")
    manifest.record("train", StageResult(artifacts={"checkpoint": str(checkpoint), "reference_answer": str(reference)}))

    result = trt_stage.run(Context(cfg=cfg, device=torch.device("cpu"), run_dir=tmp_path, manifest=manifest, tracker=None))

    assert [v.name for v in result.variants] == ["tensorrt-fp32", "tensorrt-fp16"]
    out = tmp_path / "trt"
    for precision in ("fp32", "fp16"):
        assert "Dry-Run Results" in (out / f"coverage-{precision}.txt").read_text()
        assert (out / f"retriever-{precision}.ep").is_file()
        model_dir = out / "triton" / f"retriever_trt_{precision}"
        assert (model_dir / "1" / "model.plan").read_bytes() == b"serialized engine"
        config = text_format.Parse((model_dir / "config.pbtxt").read_text(), pb.ModelConfig())
        assert config.platform == "tensorrt_plan" and config.max_batch_size == 256
        assert result.metrics[f"trt_op_coverage_{precision}"] == 0.95
        assert result.metrics[f"parity_topk_overlap_{precision}"] >= (0.999 if precision == "fp32" else 0.5)
    fp16 = result.variants[1]
    assert fp16.backend == "tensorrt" and fp16.artifact == str(out / "retriever-fp16.ep")
    assert fp16.options["top_k"] == 20 and fp16.options["inputs"] == ["history", "lengths"]
    assert fp16.options["history_range"] == [1, 16, 16] and fp16.options["batch_range"] == [1, 16, 256]
    assert result.artifacts == {"trt_dir": str(out)}
    assert [kind for kind, _ in stand_in.calls] == ["compile", "compile", "engine"] * 2  # dry run, build, engine
    dry, real, engine = (settings for _, settings in stand_in.calls[3:])
    assert dry["dryrun"] and "dryrun" not in real and real["use_fp32_acc"] and engine == real
    assert set(dry) | set(real) <= TORCH_TENSORRT_PARAMS  # every keyword exists in torch_tensorrt 2.11 and 2.13


def test_trt_config_composes_into_the_main_config():
    cfg = make_cfg("validate.top_k=50")
    assert cfg.trt.top_k == 50 and cfg.onnx.top_k == 50  # K follows validate
    assert OmegaConf.select(cfg, "trt.triton.max_batch_size") == cfg.trt.batch.max
