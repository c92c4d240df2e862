"""The Triton model repository of a champion package (registry version N): one ensemble that clients call,

    <name>                  ensemble: HISTORY [B, L] raw item ids + K [B, 1] (+ USER_ID [B, 1], optional)
                            -> ITEM_IDS [B, k] raw ids, SCORES [B, k]
                            (ids INT64; for a vocabulary of text ids UINT8 [B, bytes]: each row's ids as
                            UTF-8 text separated by newlines, right-padded with zero bytes)
    <name>_vN               the same ensemble under the release's own name (deploy smoke-tests it first)
    <name>_vN_preprocess    python: checks the request, raw ids -> model ids, right-padded to max_len, lengths,
                            user ids (-1 for a request without USER_ID)
    <name>_vN_engine        the variant: top-K model ids and scores for a batch (dynamic batching, instance groups);
                            the torch engine keeps returning users' encoder state (docs/INCREMENTAL.md)
    <name>_vN_postprocess   python: the first k, model ids -> raw ids

each `<model>/config.pbtxt` + `<model>/N/`. The steps carry the release in their names so that two releases,
whose configs may differ (history length, K), can be loaded side by side while one serves. A release is the
registry version N, or `NrM` when version N is deployed again while it serves (other serving settings, say):
`<name>_v1r2_engine` loads beside `<name>_v1_engine` rather than over it. The engine
follows the variant and the target: `local` runs it in the python backend (ONNX Runtime for an ONNX
variant, the pipeline's own loader for the others), `production` writes native onnxruntime or
tensorrt_plan configs for a full Triton image. Every config is built with tritonclient's model_config_pb2
and parsed back before it is written.

USER_ID is optional for clients. Preprocess always hands the python engines a user id per row (-1: none),
so that every request reaches the engine with the same inputs: Triton's dynamic batcher batches only
requests that carry the same set of inputs, and hits, misses and requests without a user must run together.
A native engine (production target) takes no user id; there USER_ID is checked and ignored.

serving.fused (auto: wherever the engine is a python one) folds the three steps into one python model, so that a
request costs one python-backend stub round trip instead of three:

    <name>, <name>_vN       the same ensembles (clients, the smoke test and the blue/green switch see no
                            difference), each of one step
    <name>_vN_engine        python (models/fused.py, over the python engine copied beside it as genrec_engine.py):
                            the client's HISTORY (ragged: requests of any length batch together), K, USER_ID and
                            TIMESTAMPS -> ITEM_IDS, SCORES. Each request is checked on its own with preprocess's
                            checks and messages (a bad one gets its error, the rest of the batch is served),
                            the good ones run as one batch (batch buckets, returning users' cache and its
                            metrics as above), each answer is cut to its k and mapped back as postprocess does.

USER_ID stays optional there, so requests with and without it are not batched together. A native engine
(production target with onnxruntime or tensorrt_plan) cannot take the client's inputs: the writer refuses
serving.fused=true for it.
"""
from __future__ import annotations

import importlib.util
import json
import py_compile
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from omegaconf import DictConfig
from tritonclient.grpc import model_config_pb2 as mc

from pipeline.core import PipelineError
from pipeline.serving.package import EXAMPLE_TIMES_FILE, EXAMPLES_FILE, ITEM_IDS_FILE, Package

TARGETS = ("local", "production")
MODELS_DIR = Path(__file__).parent / "models"
PLAN_FILE = "model.plan"
COMMON = "genrec_common.py"
ENGINE = "genrec_engine.py"  # the fused model's engine, beside its model.py


@dataclass(frozen=True)
class Io:
    """One tensor of a model config: dims without the batch dimension; reshape [] for a [B] tensor."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None
    optional: bool = False


@dataclass(frozen=True)
class Engine:
    """How the engine runs: `kind` is a python model file (python_*) or a native backend."""

    kind: str
    inputs: tuple[Io, ...]   # history, lengths[, timestamps]
    outputs: tuple[Io, Io]   # item ids, scores
    user_ids: Io | None = None  # one user id per row (-1: none); python engines only


CLIENT_USER_ID = Io("USER_ID", "TYPE_INT64", (1,), optional=True)   # what a client may send, one id per row
ENGINE_USER_ID = Io("USER_ID", "TYPE_INT64", (1,))                  # what a python engine always gets


def release_models(name: str, release: int | str) -> dict[str, str]:
    """The models of one release (a registry version, or `NrM`), in load order: its steps, then its own
    ensemble."""
    return {"preprocess": f"{name}_v{release}_preprocess", "engine": f"{name}_v{release}_engine",
            "postprocess": f"{name}_v{release}_postprocess", "ensemble": f"{name}_v{release}"}


def next_release(version: str, serving: str | None) -> str:
    """The release name of registry `version`'s deploy while release `serving` serves: the version itself,
    unless that version serves now (then one revision past it: 1 -> 1r2 -> 1r3), so that the new models never
    share a name with the serving ones."""
    m = re.fullmatch(r"(\d+)(?:r(\d+))?", str(serving or ""))
    if m is None or m.group(1) != str(version):
        return str(version)
    return f"{version}r{int(m.group(2) or 1) + 1}"


def cuda_only(package: Package) -> str | None:
    """Why the variant runs on CUDA only, or None when the CPU can run it too."""
    variant, built_on_cuda = package.variant, measured_on_cuda(package)
    if variant.backend in ("tensorrt", "int8_table"):
        return f"backend {variant.backend} runs on CUDA only"
    if variant.backend == "inductor" and variant.options.get("kernels") == "triton":
        return "its Triton kernels need CUDA"
    if variant.backend == "inductor" and variant.options.get("cuda_graph"):
        return "it replays CUDA graphs"
    if variant.backend == "aoti" and built_on_cuda:
        return "its AOTInductor package was compiled for CUDA"
    return None


def measured_on_cuda(package: Package) -> bool:
    return package.info.get("fingerprint", {}).get("cuda", "none") not in ("none", "")


def instance_kind(package: Package, kind: str, target: str, cuda_here: bool) -> str:
    """serving.instance_group.kind resolved: auto is KIND_GPU for a variant made on CUDA when the target has
    CUDA (a production image is assumed to), else KIND_CPU. A CUDA-only variant on the CPU is refused."""
    kinds = ("auto", "KIND_CPU", "KIND_GPU")
    if kind not in kinds:
        raise PipelineError(f"unknown serving.instance_group.kind '{kind}'; valid choices: {', '.join(kinds)}")
    gpu_target = cuda_here or target == "production"
    if kind == "auto":
        kind = "KIND_GPU" if gpu_target and (measured_on_cuda(package) or cuda_only(package)) else "KIND_CPU"
    if kind == "KIND_GPU" and not gpu_target:
        raise PipelineError("serving.instance_group.kind=KIND_GPU, but this host has no CUDA device; "
                            "use auto or KIND_CPU")
    why = cuda_only(package)
    if kind == "KIND_CPU" and why:
        where = "this host has no CUDA device" if not gpu_target else "serving.instance_group.kind=KIND_CPU"
        raise PipelineError(f"{package.variant.name} cannot be served on the CPU ({why}) and {where}; deploy it "
                            "on a GPU host, or promote a variant that runs on the CPU (promote.backends=[...])")
    return kind


def engine_device(package: Package, kind: str, target: str = "local") -> "torch.device":
    """The device the engine's instances run the variant on: the pipeline's own answer, which the server's is
    compared with, is computed there too (a CUDA-only variant has no CPU answer)."""
    import torch

    from pipeline.serving.server import cuda_available

    gpu = instance_kind(package, kind, target, cuda_available()) == "KIND_GPU" and cuda_available()
    return torch.device("cuda" if gpu else "cpu")


def choose_engine(package: Package, target: str, max_k: int) -> Engine:
    if target not in TARGETS:
        raise PipelineError(f"unknown deploy.target '{target}'; valid choices: {', '.join(TARGETS)}")
    backend, max_len = package.variant.backend, package.max_len
    times = (Io("TIMESTAMPS", "TYPE_INT64", (max_len,)),) if uses_time(package) else ()
    python_io = (Io("HISTORY", "TYPE_INT64", (max_len,)), Io("LENGTHS", "TYPE_INT64", (1,)), *times), \
                (Io("TOP_IDS", "TYPE_INT64", (max_k,)), Io("TOP_SCORES", "TYPE_FP32", (max_k,)))
    if target == "production" and backend == "onnxruntime":
        return Engine("onnxruntime", *_onnx_io(Path(package.variant.artifact), max_len, max_k, bool(times)))
    if target == "production" and backend == "tensorrt":
        if times:
            raise PipelineError("a time-bias model (model.time_bias=true) is not served through tensorrt_plan: its "
                                "Triton config takes no timestamps; promote another backend (promote.backends=[...])")
        return Engine("tensorrt_plan", *_plan_io(package, max_k))
    return Engine("python_onnxruntime" if backend == "onnxruntime" else "python_torch", *python_io, ENGINE_USER_ID)


def write_repository(package: Package, scfg: DictConfig, dst: Path, version: int, target: str,
                     cuda_here: bool = False, release: str | None = None) -> dict[str, Path]:
    """Writes the release's models into dst (emptied first); -> {model name: its folder}. version: the
    registry version (each model's version folder); release: what the models are named after (default
    the version)."""
    if scfg.max_k > package.top_k:
        raise PipelineError(f"serving.max_k={scfg.max_k} exceeds the {package.top_k} items the variant answers; "
                            f"set serving.max_k <= {package.top_k}")
    engine = choose_engine(package, target, scfg.max_k)
    kind = instance_kind(package, scfg.instance_group.kind, target, cuda_here)
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    names = release_models(scfg.model_name, release or version)
    if fused_layout(scfg.get("fused", "auto"), engine):
        return _write_fused(package, scfg, dst, version, engine, kind, names)
    folders = {
        names["preprocess"]: _write(dst, _preprocess(scfg, names["preprocess"], package), version),
        names["engine"]: _write(dst, _engine(scfg, names["engine"], engine, package, kind), version),
        names["postprocess"]: _write(dst, _postprocess(scfg, names["postprocess"], engine, package), version),
        names["ensemble"]: _write(dst, _ensemble(names["ensemble"], scfg, names, engine, version, package), version),
        scfg.model_name: _write(dst, _ensemble(scfg.model_name, scfg, names, engine, version, package), version),
    }
    for step in ("preprocess", "postprocess"):
        step_dir = folders[names[step]] / str(version)
        _python_files(step_dir, step)
        shutil.copy2(package.root / ITEM_IDS_FILE, step_dir / ITEM_IDS_FILE)
    engine_dir = folders[names["engine"]] / str(version)
    if engine.kind == "tensorrt_plan":
        shutil.copy2(_plan_dir(package) / "1" / PLAN_FILE, engine_dir / PLAN_FILE)
    else:
        for path in package.root.iterdir():
            if path.name not in (ITEM_IDS_FILE, EXAMPLES_FILE, EXAMPLE_TIMES_FILE):
                (shutil.copytree if path.is_dir() else shutil.copy2)(path, engine_dir / path.name)
    if engine.kind.startswith("python_"):
        _python_files(engine_dir, "engine_" + engine.kind.removeprefix("python_"))
        (engine_dir / "variant.json").write_text(_variant_json(package))
    return folders


def fused_layout(value, engine: Engine) -> bool:
    """serving.fused: true, false, or auto: one python model wherever the engine is a python one (the local
    target), the ensemble of three for a native engine."""
    if value == "auto":
        return engine.kind.startswith("python_")
    if isinstance(value, bool):
        return value
    raise PipelineError(f"serving.fused must be auto, true or false, got {value!r}")


def _write_fused(package: Package, scfg: DictConfig, dst: Path, version: int, engine: Engine, kind: str,
                 names: dict[str, str]) -> dict[str, Path]:
    """serving.fused=true: the engine takes the client's inputs and answers ITEM_IDS and SCORES (models/fused.py
    over the python engine), and both ensembles have that one step."""
    if not engine.kind.startswith("python_"):
        raise PipelineError(f"serving.fused=true needs a python engine, and deploy.target=production serves "
                            f"{package.variant.name} through Triton's native {engine.kind} backend; set "
                            "serving.fused=false for that target")
    folders = {
        names["engine"]: _write(dst, _fused_engine(scfg, names["engine"], engine, package, kind), version),
        names["ensemble"]: _write(dst, _fused_ensemble(names["ensemble"], scfg, names, version, package), version),
        scfg.model_name: _write(dst, _fused_ensemble(scfg.model_name, scfg, names, version, package), version),
    }
    engine_dir = folders[names["engine"]] / str(version)
    for path in package.root.iterdir():
        if path.name not in (EXAMPLES_FILE, EXAMPLE_TIMES_FILE):
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, engine_dir / path.name)
    shutil.copy2(MODELS_DIR / ("engine_" + engine.kind.removeprefix("python_") + ".py"), engine_dir / ENGINE)
    _python_files(engine_dir, "fused")
    (engine_dir / "variant.json").write_text(_variant_json(package))
    return folders


def _client_io(package: Package) -> tuple[list[Io], list[Io]]:
    """What a client sends and gets: the ensemble's inputs and outputs (optional TIMESTAMPS: the checks name
    what is missing)."""
    ids = _id_type(package)
    inputs = [Io("HISTORY", ids, (-1,)), Io("K", "TYPE_INT64", (1,)), CLIENT_USER_ID]
    if uses_time(package):
        inputs.append(Io("TIMESTAMPS", "TYPE_INT64", (-1,), optional=True))
    return inputs, [Io("ITEM_IDS", ids, (-1,)), Io("SCORES", "TYPE_FP32", (-1,))]


def _client_ensemble(name: str, scfg: DictConfig, package: Package) -> mc.ModelConfig:
    """An ensemble with the client's inputs and outputs, no steps yet."""
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=scfg.max_batch_size)
    inputs, outputs = _client_io(package)
    for io in inputs:
        _add(config.input, io)
    for io in outputs:
        _add(config.output, io)
    return config


def _fused_engine(scfg: DictConfig, name: str, engine: Engine, package: Package, kind: str) -> mc.ModelConfig:
    """The engine's config (batching, instances, parameters) with the client's inputs and outputs; HISTORY and
    TIMESTAMPS ragged, so that requests of different history lengths batch together."""
    inputs, outputs = _client_io(package)
    config = _engine(scfg, name, Engine(engine.kind, tuple(inputs), tuple(outputs)), package, kind)
    for tensor in config.input:
        if tensor.name in ("HISTORY", "TIMESTAMPS"):
            tensor.allow_ragged_batch = True
    return config


def _fused_ensemble(name: str, scfg: DictConfig, names: dict[str, str], version: int,
                    package: Package) -> mc.ModelConfig:
    config = _client_ensemble(name, scfg, package)
    inputs, outputs = _client_io(package)
    config.ensemble_scheduling.step.add(model_name=names["engine"], model_version=version,
                                        input_map={io.name: io.name for io in inputs},
                                        output_map={io.name: io.name for io in outputs})
    return config


def config_text(config: mc.ModelConfig) -> str:
    """The config.pbtxt text of config, parsed back to prove it is one."""
    text = text_format.MessageToString(config)
    if text_format.Parse(text, mc.ModelConfig()) != config:
        raise PipelineError(f"config.pbtxt of {config.name} does not read back as written")
    return text


def _write(dst: Path, config: mc.ModelConfig, version: int) -> Path:
    folder = dst / config.name
    (folder / str(version)).mkdir(parents=True)
    (folder / "config.pbtxt").write_text(config_text(config))
    return folder


def _python_files(version_dir: Path, source: str) -> None:
    shutil.copy2(MODELS_DIR / f"{source}.py", version_dir / "model.py")
    shutil.copy2(MODELS_DIR / "common.py", version_dir / COMMON)
    compile_python(version_dir)


def compile_python(version_dir: Path) -> None:
    """Byte-code for the model's Python files, written now and never checked against them: otherwise the
    stub writes __pycache__ into the model's folder when it loads, the server sees the model as modified,
    and loading the ensemble that uses it loads it a second time."""
    for source in version_dir.glob("*.py"):
        py_compile.compile(str(source), cfile=importlib.util.cache_from_source(str(source)), doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)


def _variant_json(package: Package) -> str:
    return json.dumps({**package.variant.to_dict(), "artifact": package.artifact_name}, indent=2)


def _add(tensors, io: Io) -> None:
    tensor = tensors.add(name=io.name, data_type=mc.DataType.Value(io.dtype), dims=list(io.dims))
    if io.reshape is not None:
        tensor.reshape.shape[:] = list(io.reshape)
    if io.optional:
        tensor.optional = True


def _base(scfg: DictConfig, name: str, backend: str) -> mc.ModelConfig:
    return mc.ModelConfig(name=name, backend=backend, max_batch_size=scfg.max_batch_size)


def _cpu_instances(config: mc.ModelConfig) -> None:
    """One CPU instance, taking whatever requests are queued in one call (no delay: the calls are cheap)."""
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    config.dynamic_batching.max_queue_delay_microseconds = 0


def uses_time(package: Package) -> bool:
    """A time-bias HSTU: requests carry the TIMESTAMPS of the history's actions beside HISTORY."""
    return bool(package.model_config.get("time_bias"))


def _id_type(package: Package) -> str:
    """The Triton type of raw item ids in requests and answers: for a vocabulary of text ids, UINT8 [B, bytes],
    each row the ids as UTF-8 text separated by newlines (genrec_common.pack_text)."""
    return "TYPE_UINT8" if package.vocabulary.text else "TYPE_INT64"


def _ensemble(name: str, scfg: DictConfig, names: dict[str, str], engine: Engine, version: int,
              package: Package) -> mc.ModelConfig:
    """Each step pinned to `version`: the ensemble never mixes steps of two releases."""
    config = _client_ensemble(name, scfg, package)
    timed = uses_time(package)
    steps = config.ensemble_scheduling.step
    users = {"USER_IDS": "user_ids"} if engine.user_ids else {}
    steps.add(model_name=names["preprocess"], model_version=version,
              input_map={"HISTORY": "HISTORY", "K": "K", "USER_ID": "USER_ID",
                         **({"TIMESTAMPS": "TIMESTAMPS"} if timed else {})},
              output_map={"HISTORY_PADDED": "history_padded", "LENGTHS": "lengths", **users,
                          **({"TIMESTAMPS_PADDED": "timestamps_padded"} if timed else {})})
    history, lengths, *times = engine.inputs
    ids, scores = engine.outputs
    steps.add(model_name=names["engine"], model_version=version,
              input_map={history.name: "history_padded", lengths.name: "lengths",
                         **({times[0].name: "timestamps_padded"} if times else {}),
                         **({engine.user_ids.name: "user_ids"} if engine.user_ids else {})},
              output_map={ids.name: "top_ids", scores.name: "top_scores"})
    steps.add(model_name=names["postprocess"], model_version=version,
              input_map={"TOP_IDS": "top_ids", "TOP_SCORES": "top_scores", "K": "K"},
              output_map={"ITEM_IDS": "ITEM_IDS", "SCORES": "SCORES"})
    return config


def _preprocess(scfg: DictConfig, name: str, package: Package) -> mc.ModelConfig:
    config = _base(scfg, name, "python")
    for io in _client_io(package)[0]:
        _add(config.input, io)
    _add(config.output, Io("HISTORY_PADDED", "TYPE_INT64", (package.max_len,)))
    _add(config.output, Io("LENGTHS", "TYPE_INT64", (1,)))
    _add(config.output, Io("USER_IDS", "TYPE_INT64", (1,)))
    if uses_time(package):
        _add(config.output, Io("TIMESTAMPS_PADDED", "TYPE_INT64", (package.max_len,)))
    config.parameters["max_len"].string_value = str(package.max_len)
    config.parameters["max_k"].string_value = str(scfg.max_k)
    config.parameters["time_bias"].string_value = str(uses_time(package)).lower()
    _cpu_instances(config)
    return config


def _engine(scfg: DictConfig, name: str, engine: Engine, package: Package, kind: str) -> mc.ModelConfig:
    python = engine.kind.startswith("python_")
    config = _base(scfg, name, "python" if python else engine.kind)
    if not python:
        config.backend, config.platform = "", {"onnxruntime": "onnxruntime_onnx", "tensorrt_plan": "tensorrt_plan"}[engine.kind]
        config.default_model_filename = PLAN_FILE if engine.kind == "tensorrt_plan" else package.artifact_name
    for io in (*engine.inputs, *([engine.user_ids] if engine.user_ids else [])):
        _add(config.input, io)
    for io in engine.outputs:
        _add(config.output, io)
    batching = scfg.dynamic_batching
    if batching.enabled:  # else each request runs alone as it arrives (the engine still takes batched requests)
        config.dynamic_batching.preferred_batch_size[:] = [b for b in batching.preferred_batch_size
                                                           if b <= scfg.max_batch_size]
        config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_microseconds
    config.instance_group.add(kind=mc.ModelInstanceGroup.Kind.Value(kind), count=scfg.instance_group.count)
    config.parameters["max_k"].string_value = str(scfg.max_k)
    config.parameters["max_len"].string_value = str(package.max_len)
    config.parameters["threads"].string_value = str(scfg.threads)
    if python:
        config.parameters["batch_buckets"].string_value = _buckets_param(scfg, package)
        cache = scfg.get("cache") or {}
        config.parameters["cache_enabled"].string_value = str(bool(cache.get("enabled", False))).lower()
        for key in ("gpu_bytes", "host_bytes"):
            value = int(cache.get(key, 0))
            if value < 0:
                raise PipelineError(f"serving.cache.{key}={value}: a budget is >= 0 bytes (0 turns the tier off)")
            config.parameters[f"cache_{key}"].string_value = str(value)
        page_size = int(cache.get("page_size", 64))
        if page_size < 1:
            raise PipelineError(f"serving.cache.page_size={page_size}: a page holds >= 1 position")
        config.parameters["cache_page_size"].string_value = str(page_size)
        config.parameters["cache_cuda_graphs"].string_value = str(bool(cache.get("cuda_graphs", True))).lower()
    config.parameters["time_bias"].string_value = str(uses_time(package)).lower()
    return config


def built_batch_sizes(package: Package) -> list[int]:
    """The batch sizes the build compiled and timed this variant at (validate's latency_*_b<N> metrics)."""
    metrics = (package.info or {}).get("metrics") or {}
    sizes = {int(m.group(1)) for key in metrics if (m := re.fullmatch(r"latency_\w+_b(\d+)", key))}
    return sorted(sizes)


def _buckets_param(scfg: DictConfig, package: Package | None = None) -> str:
    """serving.batch_buckets as the engine's parameter, checked here, at deploy: "auto" becomes "auto:<the
    batch sizes the build made>" when the package records them; a list becomes "1,2,4"."""
    from pipeline.serving.models.common import batch_buckets

    value = scfg.get("batch_buckets", "auto")
    spec = value if isinstance(value, str) else str(value) if isinstance(value, int) else ",".join(map(str, value))
    built = built_batch_sizes(package) if package is not None and spec.strip() == "auto" else []
    if built:
        spec = "auto:" + ",".join(map(str, built))
    try:
        batch_buckets(spec, int(scfg.max_batch_size), gpu=True)
    except ValueError as err:
        raise PipelineError(f"serving.batch_buckets: {err}") from None
    return spec


def _postprocess(scfg: DictConfig, name: str, engine: Engine, package: Package) -> mc.ModelConfig:
    config = _base(scfg, name, "python")
    ids, scores = engine.outputs
    _add(config.input, Io("TOP_IDS", ids.dtype, ids.dims))
    _add(config.input, Io("TOP_SCORES", scores.dtype, scores.dims))
    _add(config.input, Io("K", "TYPE_INT64", (1,)))
    _add(config.output, Io("ITEM_IDS", _id_type(package), (-1,)))
    _add(config.output, Io("SCORES", "TYPE_FP32", (-1,)))
    _cpu_instances(config)
    return config


_ONNX_TYPES = {"INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16",
               "BFLOAT16": "TYPE_BF16"}


def _onnx_io(path: Path, max_len: int, max_k: int, timed: bool = False) -> tuple[tuple[Io, ...], tuple[Io, Io]]:
    """The ONNX graph's own tensor names and types: (history [B, L], lengths [B][, timestamps [B, L]]) ->
    (ids [B, K], scores [B, K])."""
    import onnx

    graph = onnx.load_model(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if len(inputs) != 2 + timed or len(graph.output) < 2:
        expected = "(history, lengths, timestamps)" if timed else "(history, lengths)"
        raise PipelineError(f"{path.name}: expected inputs {expected} and outputs (item ids, scores), got "
                            f"inputs {[i.name for i in inputs]} and outputs {[o.name for o in graph.output]}")

    def spec(value) -> tuple[str, list[int | None]]:
        kind = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
        if kind not in _ONNX_TYPES:
            raise PipelineError(f"{path.name}: tensor {value.name} has type {kind}, which the repository does not map")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        return _ONNX_TYPES[kind], dims

    (h_type, h_dims), (l_type, _), (i_type, i_dims), (s_type, s_dims) = map(spec, [*inputs[:2], *graph.output[:2]])
    if timed and spec(inputs[2])[0] != "TYPE_INT64":
        raise PipelineError(f"{path.name}: timestamps must be int64, got {spec(inputs[2])[0]}")
    if (h_type, l_type) != ("TYPE_INT64", "TYPE_INT64"):
        raise PipelineError(f"{path.name}: history and lengths must be int64, got {h_type} and {l_type}")
    if h_dims[1] not in (None, max_len):
        raise PipelineError(f"{path.name}: the graph takes histories of {h_dims[1]} items, the model {max_len}")
    k = i_dims[1] if i_dims[1] is not None else -1
    if k != -1 and k < max_k:
        raise PipelineError(f"{path.name}: the graph answers top-{k}, fewer than serving.max_k={max_k}")
    times = (Io(inputs[2].name, "TYPE_INT64", (max_len,)),) if timed else ()
    return ((Io(inputs[0].name, h_type, (max_len,)), Io(inputs[1].name, l_type, (1,), reshape=()), *times),
            (Io(graph.output[0].name, i_type, (k,)), Io(graph.output[1].name, s_type, (k,))))


def _plan_dir(package: Package) -> Path:
    folder = package.variant.options.get("triton_model")
    if not folder or not (Path(folder) / "1" / PLAN_FILE).is_file():
        raise PipelineError(f"{package.variant.name} carries no serialized TensorRT engine for Triton "
                            "(options.triton_model); run stage=trt again, then promote")
    return Path(folder)


def _plan_io(package: Package, max_k: int) -> tuple[tuple[Io, Io], tuple[Io, Io]]:
    """The engine's own tensors, from the config.pbtxt the trt stage wrote beside the plan (TensorRT's
    names, types and shapes): inputs (history, lengths), outputs (item ids, scores), in that order."""
    plan = text_format.Parse((_plan_dir(package) / "config.pbtxt").read_text(), mc.ModelConfig())
    if len(plan.input) < 2 or len(plan.output) < 2:
        raise PipelineError(f"{package.variant.name}: the engine needs inputs (history, lengths) and outputs "
                            f"(item ids, scores), has {[t.name for t in plan.input]} -> {[t.name for t in plan.output]}")

    def io(tensor) -> Io:
        return Io(tensor.name, mc.DataType.Name(tensor.data_type), tuple(tensor.dims),
                  tuple(tensor.reshape.shape) if tensor.HasField("reshape") else None)

    ids = io(plan.output[0])
    if ids.dims[0] != -1 and ids.dims[0] < max_k:
        raise PipelineError(f"{package.variant.name}: the engine answers top-{ids.dims[0]}, fewer than serving.max_k={max_k}")
    return (io(plan.input[0]), io(plan.input[1])), (ids, io(plan.output[1]))
