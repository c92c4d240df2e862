"""The serving pieces that need no server: request checks and id mapping, the repository writer (every
config.pbtxt parsed back; local and production engines), the TensorRT fingerprint check, the server's
command line and environment."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from conftest import ROOT
from pipeline.core import PipelineError, Variant
from pipeline.serving.config import load_config
from pipeline.integrity import write_digest
from pipeline.serving.models.common import (RequestError, Vocabulary, check_request, check_timestamps, pack_text, pad,
                                            unpack_text)
from pipeline.serving.package import read_package, variant_digest, write_package
from pipeline.serving.repository import instance_kind, write_repository
from pipeline.serving.server import LocalServer, ServerError, TritonInstall

RAW = np.array([-1, 30, 10, 20, 40])  # model ids 1..4 are raw 30, 10, 20, 40 (not sorted)


def test_vocabulary_maps_raw_ids_both_ways():
    vocab = Vocabulary(RAW)
    assert vocab.encode(np.array([[10, 40, 30]])).tolist() == [[2, 4, 1]]
    assert vocab.decode(np.array([2, 4, 1, 0])).tolist() == [10, 40, 30, -1]
    with pytest.raises(RequestError, match=r"unknown item ids \(2\): 11, 99"):
        vocab.encode(np.array([[10, 99, 11]]))


def test_vocabulary_by_table_and_by_sorted_search_agree():
    # Dense integer ids go through a table, sparse ones (beyond 4 per item and 2**20) through a sorted search;
    # raw id 0 is an item here, so an out-of-range id must not read the table's slot 0.
    rng = np.random.default_rng(0)
    dense = Vocabulary(np.array([-1, 0, 7, 3, 1 << 19]))
    sparse = Vocabulary(np.array([-1, 0, 7, 3, 1 << 40]))
    assert dense._table is not None and sparse._table is None
    assert dense.encode(np.array([[3, 0, 7, 1 << 19]])).tolist() == [[3, 1, 2, 4]]
    assert dense.encode(np.array([[3]])).dtype == sparse.encode(np.array([[3]])).dtype == np.int64
    assert sparse.encode(np.array([[3, 0, 7, 1 << 40]])).tolist() == [[3, 1, 2, 4]]
    for vocab in (dense, sparse):
        with pytest.raises(RequestError, match=r"unknown item ids \(3\): -1, 5, 1099511627777"):
            vocab.encode(np.array([[0, -1, 5, (1 << 40) + 1]]))
    for _ in range(50):
        raw = np.array([-1, *rng.choice(5000, size=rng.integers(1, 300), replace=False)])
        table, search = Vocabulary(raw), Vocabulary(raw)
        search._table = None
        known = rng.choice(raw[1:], (4, 30))
        assert (table.encode(known) == search.encode(known)).all()
        assert (raw[table.encode(known)] == known).all()


def test_vocabulary_of_text_ids_and_their_packing():
    vocab = Vocabulary(np.array([None, "b", "a10", "a9"], dtype=object))  # as data=interactions gives text ids
    assert vocab.text and vocab.encode(np.array([["a9", "b"]])).tolist() == [[3, 1]]
    assert vocab.decode(np.array([2, 0])).tolist() == ["a10", ""]
    with pytest.raises(RequestError, match=r"unknown item ids \(1\): a1; the model knows 3 items"):
        vocab.encode(np.array([["a1", "b"]]))
    packed = pack_text([["b", "ünï"], ["a9", ""]])
    assert packed.dtype == np.uint8 and packed.shape == (2, len("b\nünï".encode()))
    assert unpack_text(packed).tolist() == [["b", "ünï"], ["a9", ""]]
    with pytest.raises(RequestError, match=r"same number of ids, got \[2, 1\]"):
        unpack_text(pack_text([["a", "b"], ["c"]]))
    with pytest.raises(RequestError, match="must be UTF-8 text"):
        unpack_text(np.array([[0x61, 0xFF]], dtype=np.uint8))
    with pytest.raises(RequestError, match=r"UINT8 tensor \[batch, bytes\], got int64"):
        unpack_text(np.array([[1, 2]]))


def test_text_vocabulary_makes_uint8_ids_in_the_ensemble(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"x")
    write_digest(checkpoint)
    package = write_package(tmp_path / "pkg", Variant("eager-fp32", "eager", "fp32", str(checkpoint), "train"),
                            model_config={"name": "hstu", "max_len": 8}, top_k=20,
                            raw_item_ids=np.array([None, "x", "y"], dtype=object), examples=[["x", "y"]],
                            info={"metrics": {}})
    assert read_package(package.root).examples == [["x", "y"]] and package.vocabulary.text
    configs = _configs(write_repository(package, _cfg(tmp_path).serving, tmp_path / "repo", 1, "local"))
    kinds = {(m, t.name): mc.DataType.Name(t.data_type) for m, c in configs.items() for t in (*c.input, *c.output)}
    assert kinds[("genrec", "HISTORY")] == kinds[("genrec", "ITEM_IDS")] == "TYPE_UINT8"
    assert kinds[("genrec_v1_preprocess", "HISTORY")] == kinds[("genrec_v1_postprocess", "ITEM_IDS")] == "TYPE_UINT8"
    assert kinds[("genrec_v1_preprocess", "HISTORY_PADDED")] == "TYPE_INT64"
    fused = _configs(write_repository(package, _cfg(tmp_path, "serving.fused=true").serving, tmp_path / "f", 1, "local"))
    engine = {t.name: t for t in (*fused["genrec_v1_engine"].input, *fused["genrec_v1_engine"].output)}
    assert engine["HISTORY"].data_type == engine["ITEM_IDS"].data_type == mc.TYPE_UINT8
    assert engine["HISTORY"].allow_ragged_batch  # rows of text of any byte length batch together


def test_time_bias_model_takes_optional_timestamps_through_the_ensemble(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"x")
    write_digest(checkpoint)
    package = write_package(tmp_path / "pkg", Variant("eager-fp32", "eager", "fp32", str(checkpoint), "train"),
                            model_config={"name": "hstu", "max_len": 8, "time_bias": True}, top_k=20, raw_item_ids=RAW,
                            examples=[[10, 20]], example_timestamps=[[100, 160]], info={"metrics": {}})
    assert read_package(package.root).example(3) == ([10, 20], [100, 160])
    configs = _configs(write_repository(package, _cfg(tmp_path).serving, tmp_path / "repo", 1, "local"))
    optional = {(m, t.name): t.optional for m, c in configs.items() for t in c.input}
    assert optional[("genrec", "TIMESTAMPS")] and optional[("genrec_v1_preprocess", "TIMESTAMPS")]
    assert not optional[("genrec", "HISTORY")] and not optional[("genrec_v1_engine", "TIMESTAMPS")]
    steps = configs["genrec"].ensemble_scheduling.step
    assert steps[0].input_map["TIMESTAMPS"] == "TIMESTAMPS"
    assert steps[1].input_map["TIMESTAMPS"] == steps[0].output_map["TIMESTAMPS_PADDED"] == "timestamps_padded"
    assert configs["genrec_v1_engine"].parameters["time_bias"].string_value == "true"
    fused = _configs(write_repository(package, _cfg(tmp_path, "serving.fused=true").serving, tmp_path / "f", 1, "local"))
    times = {t.name: t for t in fused["genrec_v1_engine"].input}["TIMESTAMPS"]
    assert times.optional and times.allow_ragged_batch and list(times.dims) == [-1]
    assert fused["genrec"].ensemble_scheduling.step[0].input_map["TIMESTAMPS"] == "TIMESTAMPS"
    assert fused["genrec_v1_engine"].parameters["time_bias"].string_value == "true"
    plain = _package(tmp_path, Variant("eager-fp32", "eager", "fp32", str(checkpoint), "train"))
    plain_configs = _configs(write_repository(plain, _cfg(tmp_path).serving, tmp_path / "repo2", 1, "local"))
    assert [t.name for t in plain_configs["genrec"].input] == ["HISTORY", "K", "USER_ID"]  # no TIMESTAMPS


def test_timestamps_are_checked():
    history = np.array([[3, 4]])
    assert check_timestamps(np.array([[5, 6]], np.int32), history).dtype == np.int64
    with pytest.raises(RequestError, match=r"model.time_bias=true\): send TIMESTAMPS \[batch, length\]"):
        check_timestamps(None, history)
    with pytest.raises(RequestError, match=r"TIMESTAMPS has shape \[1, 3\], HISTORY \[1, 2\]"):
        check_timestamps(np.array([[1, 2, 3]]), history)
    with pytest.raises(RequestError, match="must be integers"):
        check_timestamps(np.array([[1.5, 2.0]]), history)


@pytest.mark.parametrize("history, k, message", [
    (np.zeros((1, 0), np.int64), [[5]], "empty history"),
    (np.ones((1, 9), np.int64), [[5]], "longer than the maximum 8"),
    (np.array([[3, -2]]), [[5]], "negative item ids: -2"),
    (np.array([[3, 4]]), [[0]], "k=0 is out of range; valid: 1..20"),
    (np.array([[3, 4]]), [[21]], "k=21 is out of range"),
    (np.array([[3, 4], [5, 6]]), [[1], [2]], "same for every row"),
])
def test_bad_requests_are_named(history, k, message):
    with pytest.raises(RequestError, match=message):
        check_request(history, np.array(k), max_len=8, max_k=20)


def test_padding_is_right_padding_with_lengths():
    padded, lengths = pad(np.array([[5, 6, 7]]), 5)
    assert padded.tolist() == [[5, 6, 7, 0, 0]] and lengths.tolist() == [[3]]


def _cfg(tmp_path, *overrides):
    """The serving config; the three-model layout unless the overrides name serving.fused (its default, auto,
    is tested on its own)."""
    layout = [] if any(o.startswith("serving.fused=") for o in overrides) else ["serving.fused=false"]
    return load_config([f"artifacts_dir={tmp_path / 'artifacts'}", "validate.top_k=20", *layout, *overrides])


def _package(tmp_path, variant: Variant, max_len=8):
    return write_package(tmp_path / "pkg", variant, model_config={"name": "hstu", "max_len": max_len}, top_k=20,
                         raw_item_ids=RAW, examples=[[10, 20]], info={"metrics": {}})


def _configs(folders) -> dict[str, mc.ModelConfig]:
    return {name: text_format.Parse((folder / "config.pbtxt").read_text(), mc.ModelConfig())
            for name, folder in folders.items()}


def test_local_repository_is_an_ensemble_of_three_python_models(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    package = _package(tmp_path, Variant("eager-fp32", "eager", "fp32", str(checkpoint), "train"))
    cfg = _cfg(tmp_path, "serving.max_batch_size=32", "serving.instance_group.count=2")
    folders = write_repository(package, cfg.serving, tmp_path / "repo", 7, "local")
    configs = _configs(folders)
    assert set(configs) == {"genrec", "genrec_v7", "genrec_v7_preprocess", "genrec_v7_engine", "genrec_v7_postprocess"}
    ensemble, engine = configs["genrec"], configs["genrec_v7_engine"]
    assert ensemble.platform == "ensemble" and ensemble.max_batch_size == 32
    for name in ("genrec", "genrec_v7"):  # the public ensemble and the release's own: the same steps
        steps = configs[name].ensemble_scheduling.step
        assert [(s.model_name, s.model_version) for s in steps] == [
            ("genrec_v7_preprocess", 7), ("genrec_v7_engine", 7), ("genrec_v7_postprocess", 7)]
    assert engine.backend == "python" and engine.instance_group[0].count == 2
    assert engine.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU  # auto, on a variant made on the CPU
    assert list(engine.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert list(engine.input[0].dims) == [8]  # histories padded to max_len: requests batch together
    engine_dir = folders["genrec_v7_engine"] / "7"
    assert (engine_dir / "model.py").read_text() == (ROOT / "pipeline/serving/models/engine_torch.py").read_text()
    assert json.loads((engine_dir / "variant.json").read_text())["artifact"] == "model.pt"
    assert (engine_dir / "model.pt").read_bytes() == b"weights"
    for step in ("genrec_v7_preprocess", "genrec_v7_postprocess"):
        assert {p.name for p in (folders[step] / "7").iterdir()} == {"model.py", "genrec_common.py", "item_ids.npy",
                                                                "__pycache__"}
        assert len(list((folders[step] / "7" / "__pycache__").glob("*.pyc"))) == 2  # the stub writes none
    assert (folders["genrec"] / "7").is_dir()


def _tiny_onnx(path: Path, k: int = 20, timestamps: bool = False) -> Path:
    """A graph with the variants' signature: (history [B, L], lengths [B][, timestamps [B, L]]) ->
    (item_ids [B, K], scores [B, K])."""
    times = [helper.make_tensor_value_info("timestamps", TensorProto.INT64, ["batch", "length"])] if timestamps else []
    graph = helper.make_graph(
        [helper.make_node("Cast", ["history"], ["scores_wide"], to=TensorProto.FLOAT),
         helper.make_node("TopK", ["scores_wide", "k"], ["scores", "item_ids"])],
        "tiny",
        [helper.make_tensor_value_info("history", TensorProto.INT64, ["batch", "length"]),
         helper.make_tensor_value_info("lengths", TensorProto.INT64, ["batch"]), *times],
        [helper.make_tensor_value_info("item_ids", TensorProto.INT64, ["batch", k]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", k])],
        initializer=[helper.make_tensor("k", TensorProto.INT64, [1], [k])],
    )
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_production_onnxruntime_engine_of_a_time_bias_model_takes_timestamps(tmp_path):
    model = _tiny_onnx(tmp_path / "retriever-fp32.onnx", timestamps=True)
    write_digest(model)
    package = write_package(tmp_path / "pkg", Variant("onnxruntime-fp32", "onnxruntime", "fp32", str(model), "onnx"),
                            model_config={"name": "hstu", "max_len": 8, "time_bias": True}, top_k=20, raw_item_ids=RAW,
                            examples=[[10, 20]], example_timestamps=[[1, 2]], info={"metrics": {}})
    configs = _configs(write_repository(package, _cfg(tmp_path).serving, tmp_path / "repo", 3, "production"))
    assert [(i.name, list(i.dims)) for i in configs["genrec_v3_engine"].input] == [
        ("history", [8]), ("lengths", [1]), ("timestamps", [8])]
    assert dict(configs["genrec"].ensemble_scheduling.step[1].input_map) == {
        "history": "history_padded", "lengths": "lengths", "timestamps": "timestamps_padded"}
    two_inputs = _tiny_onnx(tmp_path / "two.onnx")
    write_digest(two_inputs)
    package = write_package(tmp_path / "pkg2", Variant("onnxruntime-fp32", "onnxruntime", "fp32", str(two_inputs),
                                                       "onnx"), model_config={"name": "hstu", "max_len": 8,
                                                                              "time_bias": True},
                            top_k=20, raw_item_ids=RAW, examples=[[10, 20]], info={"metrics": {}})
    with pytest.raises(PipelineError, match=r"expected inputs \(history, lengths, timestamps\)"):
        write_repository(package, _cfg(tmp_path).serving, tmp_path / "repo2", 3, "production")


def test_dynamic_batching_can_be_turned_off(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    package = _package(tmp_path, Variant("eager-fp32", "eager", "fp32", str(checkpoint), "train"))
    cfg = _cfg(tmp_path, "serving.dynamic_batching.enabled=false")
    engine = _configs(write_repository(package, cfg.serving, tmp_path / "repo", 1, "local"))["genrec_v1_engine"]
    assert not engine.HasField("dynamic_batching")


def test_the_pipelines_own_answer_is_computed_on_the_engines_device(tmp_path, monkeypatch):
    from pipeline.serving import repository, server

    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    options = {"mode": "max-autotune-no-cudagraphs", "kernels": "triton", "cuda_graph": True}
    package = _package(tmp_path, Variant("inductor-max-autotune-graph-triton-fp16", "inductor", "fp16",
                                         str(checkpoint), "compile", options))
    monkeypatch.setattr(server, "cuda_available", lambda: False)
    with pytest.raises(PipelineError, match="cannot be served on the CPU"):
        repository.engine_device(package, "auto")
    monkeypatch.setattr(server, "cuda_available", lambda: True)  # the GPU host where this broke deploy
    assert repository.engine_device(package, "auto").type == "cuda"
    made_on_cpu = write_package(tmp_path / "cpu", Variant("eager-fp32", "eager", "fp32", str(checkpoint), "train"),
                                model_config={"name": "hstu", "max_len": 8}, top_k=20, raw_item_ids=RAW,
                                examples=[[10, 20]], info={"metrics": {}, "fingerprint": {"cuda": "none"}})
    assert repository.engine_device(made_on_cpu, "auto").type == "cpu"
    assert repository.engine_device(made_on_cpu, "KIND_GPU").type == "cuda"


def test_production_onnxruntime_engine_uses_the_graphs_names(tmp_path):
    model = _tiny_onnx(tmp_path / "retriever-fp32.onnx")
    package = _package(tmp_path, Variant("onnxruntime-fp32", "onnxruntime", "fp32", str(model), "onnx"))
    folders = write_repository(package, _cfg(tmp_path).serving, tmp_path / "repo", 3, "production")
    engine = _configs(folders)["genrec_v3_engine"]
    assert engine.platform == "onnxruntime_onnx" and engine.default_model_filename == "retriever-fp32.onnx"
    assert [i.name for i in engine.input] == ["history", "lengths"]
    assert engine.input[1].HasField("reshape") and list(engine.input[1].reshape.shape) == []
    assert [(o.name, list(o.dims)) for o in engine.output] == [("item_ids", [20]), ("scores", [20])]
    step = _configs(folders)["genrec"].ensemble_scheduling.step[1]
    assert dict(step.input_map) == {"history": "history_padded", "lengths": "lengths"}
    assert (folders["genrec_v3_engine"] / "3" / "retriever-fp32.onnx").is_file()
    assert not (folders["genrec_v3_engine"] / "3" / "model.py").exists()  # native backend, no python


def test_production_onnx_graph_answering_too_few_items_is_refused(tmp_path):
    model = _tiny_onnx(tmp_path / "small.onnx", k=5)
    package = _package(tmp_path, Variant("onnxruntime-fp32", "onnxruntime", "fp32", str(model), "onnx"))
    with pytest.raises(PipelineError, match="answers top-5, fewer than serving.max_k=20"):
        write_repository(package, _cfg(tmp_path).serving, tmp_path / "repo", 1, "production")


def test_production_tensorrt_plan_config_follows_the_trt_stages_engine(tmp_path):
    program = tmp_path / "retriever-fp16.ep"
    program.write_bytes(b"program")
    plan_model = tmp_path / "triton" / "retriever_trt_fp16"  # as the trt stage writes it
    (plan_model / "1").mkdir(parents=True)
    (plan_model / "1" / "model.plan").write_bytes(b"engine")
    trt_config = mc.ModelConfig(name="retriever_trt_fp16", platform="tensorrt_plan", max_batch_size=64)
    trt_config.input.add(name="history", data_type=mc.TYPE_INT64, dims=[-1])
    trt_config.input.add(name="lengths", data_type=mc.TYPE_INT64, dims=[1]).reshape.SetInParent()
    trt_config.output.add(name="item_ids", data_type=mc.TYPE_INT64, dims=[20])
    trt_config.output.add(name="scores", data_type=mc.TYPE_FP16, dims=[20])
    (plan_model / "config.pbtxt").write_text(text_format.MessageToString(trt_config))
    variant = Variant("tensorrt-fp16", "tensorrt", "fp16", str(program), "trt", {"triton_model": str(plan_model)})
    folders = write_repository(_package(tmp_path, variant), _cfg(tmp_path).serving, tmp_path / "repo", 1, "production")
    configs = _configs(folders)
    engine = configs["genrec_v1_engine"]
    assert engine.platform == "tensorrt_plan" and engine.default_model_filename == "model.plan"
    assert [(i.name, list(i.dims)) for i in engine.input] == [("history", [-1]), ("lengths", [1])]
    assert engine.input[1].HasField("reshape")
    assert (folders["genrec_v1_engine"] / "1" / "model.plan").read_bytes() == b"engine"
    assert engine.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU  # auto: production images have GPUs
    assert configs["genrec_v1_postprocess"].input[1].data_type == mc.TYPE_FP16  # cast to fp32 there


def _made_on(tmp_path, variant: Variant, cuda: str):
    return write_package(tmp_path / "pkg", variant, model_config={"name": "hstu", "max_len": 8}, top_k=20,
                         raw_item_ids=RAW, examples=[[10, 20]], info={"fingerprint": {"cuda": cuda}})


def test_instance_kind_follows_the_variant_and_the_host(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    eager = Variant("eager-fp16", "eager", "fp16", str(checkpoint), "train")
    triton = Variant("inductor-triton-fp16", "inductor", "fp16", str(checkpoint), "compile", {"kernels": "triton"})
    assert instance_kind(_made_on(tmp_path, eager, "12.8"), "auto", "local", cuda_here=True) == "KIND_GPU"
    assert instance_kind(_made_on(tmp_path, eager, "12.8"), "auto", "local", cuda_here=False) == "KIND_CPU"
    assert instance_kind(_made_on(tmp_path, eager, "none"), "auto", "local", cuda_here=True) == "KIND_CPU"
    assert instance_kind(_made_on(tmp_path, eager, "none"), "KIND_GPU", "local", cuda_here=True) == "KIND_GPU"
    with pytest.raises(PipelineError, match=r"inductor-triton-fp16 cannot be served on the CPU \(its Triton "
                                            r"kernels need CUDA\) and this host has no CUDA device"):
        instance_kind(_made_on(tmp_path, triton, "12.8"), "auto", "local", cuda_here=False)
    with pytest.raises(PipelineError, match="KIND_GPU, but this host has no CUDA device"):
        instance_kind(_made_on(tmp_path, eager, "none"), "KIND_GPU", "local", cuda_here=False)
    with pytest.raises(PipelineError, match="valid choices: auto, KIND_CPU, KIND_GPU"):
        instance_kind(_made_on(tmp_path, eager, "none"), "GPU", "local", cuda_here=False)


def test_package_round_trip_and_digest(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    variant = Variant("eager-fp32", "eager", "fp32", str(checkpoint), "train")
    package = read_package(_package(tmp_path, variant).root)
    assert package.variant.artifact == str(tmp_path / "pkg" / "model.pt")
    assert package.examples == [[10, 20]] and package.max_len == 8
    assert variant_digest(variant) == variant_digest(package.variant)
    checkpoint.write_bytes(b"other weights")
    assert variant_digest(variant) != variant_digest(package.variant)


def test_tensorrt_engine_for_another_gpu_is_refused(tmp_path):
    from pipeline.stages.deploy import _check_fingerprint

    cfg = _cfg(tmp_path, "deploy.target_fingerprint.device_name='NVIDIA H100 80GB HBM3'",
               "deploy.target_fingerprint.tensorrt_version=10.9.0")
    ctx = SimpleNamespace(device=__import__("torch").device("cpu"))
    built = {"backend": "tensorrt", "device_name": "NVIDIA A100-SXM4-80GB", "tensorrt_version": "10.9.0"}
    with pytest.raises(PipelineError, match="device_name='NVIDIA A100-SXM4-80GB'.*rebuild it there"):
        _check_fingerprint(SimpleNamespace(version="4", tags=built), cfg.deploy, ctx)
    same = {**built, "device_name": "NVIDIA H100 80GB HBM3"}
    _check_fingerprint(SimpleNamespace(version="4", tags=same), cfg.deploy, ctx)
    _check_fingerprint(SimpleNamespace(version="4", tags={"backend": "onnxruntime"}), cfg.deploy, ctx)


def test_server_binds_loopback_with_explicit_model_control(tmp_path):
    cfg = _cfg(tmp_path, "serving.http_port=18000", "serving.grpc_port=18001", "serving.metrics_port=18002")
    server = LocalServer(cfg.serving)
    install = TritonInstall(tmp_path / "triton")
    command = server.command(install)
    for flag in ("--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
                 "--model-control-mode=explicit", "--grpc-port=18001", f"--model-repository={server.repository}"):
        assert flag in command
    env = server.environment(install)
    assert env["PATH"].split(":")[0] == str(Path(__import__("sys").executable).parent)
    assert str(install.libs) in env["LD_LIBRARY_PATH"].split(":")


def test_missing_server_says_how_to_get_it(tmp_path):
    with pytest.raises(ServerError, match="make triton"):
        TritonInstall.find(tmp_path / "nothing")


def test_after_a_failed_deploy_the_next_promote_keeps_the_serving_version_as_previous(tmp_path):
    from pipeline.tracking import Tracker

    tracker = Tracker(_cfg(tmp_path).mlflow, tmp_path / "artifacts")
    tracker.client.create_registered_model("genrec")
    for _ in range(3):
        tracker.client.create_model_version("genrec", source=(tmp_path / "pkg").as_uri())
    aliases = lambda: {a: str(v) for a, v in tracker.client.get_registered_model("genrec").aliases.items()}  # noqa: E731
    tracker.make_champion("genrec", "1")
    tracker.make_champion("genrec", "2")
    # What deploy does when version 2 fails while version 1 serves (and nothing served before 1):
    tracker.set_alias("genrec", "failed", "2")
    tracker.set_alias("genrec", "champion", "1")
    tracker.set_alias("genrec", "previous", None)
    assert aliases() == {"champion": "1", "failed": "2"}
    tracker.make_champion("genrec", "3")
    assert aliases() == {"champion": "3", "previous": "1", "failed": "2"}


def test_metrics_of_gpu_instances_are_counted():
    # Lines as tritonserver 2.x prints them on a GPU host (H200): a KIND_GPU instance's counters carry
    # gpu_uuid before model=, and the plain label set of the same model stays 0.
    from pipeline.serving.loadtest import parse_metrics

    text = "\n".join([
        "# HELP nv_inference_count Number of inferences performed",
        'nv_inference_count{gpu_uuid="GPU-535cca4f",model="genrec_v1_engine",version="1"} 2609',
        'nv_inference_count{model="genrec_v1_engine",version="1"} 0',
        'nv_inference_count{model="genrec",version="1"} 2605',
        'nv_inference_exec_count{gpu_uuid="GPU-535cca4f",model="genrec_v1_engine",version="1"} 1210',
        'nv_inference_exec_count{model="genrec_v1_engine",version="2"} 5',
        'nv_gpu_utilization{gpu_uuid="GPU-535cca4f"} 0',
    ])
    values = parse_metrics(text)
    assert values[("count", "genrec_v1_engine")] == 2609
    assert values[("exec_count", "genrec_v1_engine")] == 1215
    assert values[("count", "genrec")] == 2605
    assert not any(model is None for _, model in values)


def test_batch_buckets_pad_a_batch_to_the_smallest_bucket_that_holds_it():
    from pipeline.serving.models.common import batch_buckets, bucket_for, pad_rows

    assert batch_buckets("auto", 64, gpu=True) == [1, 4, 16, 64]
    assert batch_buckets("auto", 48, gpu=True) == [1, 4, 16, 48]
    assert batch_buckets("auto", 64, gpu=False) == []
    assert batch_buckets("auto:1,16,128", 128, gpu=True) == [1, 16, 128]   # the sizes the build made
    assert batch_buckets("auto:1,16,128", 64, gpu=True) == [1, 16, 64]
    assert batch_buckets("auto:1,16,128", 128, gpu=False) == []
    assert batch_buckets("8,1", 64, gpu=False) == [1, 8]
    assert [bucket_for(n, [1, 8, 64]) for n in (1, 2, 8, 9, 64)] == [1, 8, 8, 64, 64]
    assert bucket_for(5, []) == 5
    rows = np.array([[3, 4, 0], [5, 0, 0]])
    assert pad_rows(rows, 4).tolist() == [[3, 4, 0], [5, 0, 0], [3, 4, 0], [3, 4, 0]]
    with pytest.raises(ValueError, match=r"must lie in 1..64"):
        batch_buckets("0,8", 64, gpu=True)
    with pytest.raises(ValueError, match="must be 'auto' or comma-separated sizes"):
        batch_buckets("eight", 64, gpu=True)


def test_bad_batch_buckets_are_refused_at_deploy(tmp_path):
    from pipeline.serving.repository import _buckets_param

    cfg = load_config(["serving.batch_buckets=[1,256]"])
    with pytest.raises(PipelineError, match=r"serving.batch_buckets: batch_buckets \[1, 256\] must lie in 1..128"):
        _buckets_param(cfg.serving)
    assert _buckets_param(load_config(["serving.batch_buckets=[8,1]"]).serving) == "8,1"


def test_a_version_deployed_while_it_serves_is_a_new_release():
    from pipeline.serving.repository import next_release, release_models

    assert next_release("3", None) == "3" and next_release("3", "2") == "3" and next_release("3", "2r4") == "3"
    assert next_release("3", "3") == "3r2" and next_release("3", "3r2") == "3r3" and next_release("3", "13") == "3"
    assert release_models("genrec", "3r2")["engine"] == "genrec_v3r2_engine"


def test_auto_batch_buckets_are_the_sizes_the_build_made(tmp_path):
    """deploy turns batch_buckets=auto into the batch sizes validate compiled and timed the champion at (its
    latency metrics), so that a GPU engine's load compiles nothing new."""
    from pipeline.serving.repository import _buckets_param

    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    package = write_package(tmp_path / "pkg", Variant("eager-fp32", "eager", "fp32", str(checkpoint), "train"),
                            model_config={"name": "hstu", "max_len": 8}, top_k=20, raw_item_ids=RAW,
                            examples=[[10, 20]], info={"metrics": {"hr10": 0.5, "latency_p99_ms_b1": 0.2,
                                                                   "latency_p99_ms_b16": 0.3, "users_per_s_b16": 9.0,
                                                                   "latency_p99_ms_b128": 0.4}})
    serving = load_config([]).serving
    assert _buckets_param(serving, package) == "auto:1,16,128"
    assert _buckets_param(serving, _package(tmp_path / "bare", package.variant)) == "auto"  # nothing recorded
    configs = _configs(write_repository(package, _cfg(tmp_path).serving, tmp_path / "repo", 2, "local"))
    assert configs["genrec_v2_engine"].parameters["batch_buckets"].string_value == "auto:1,16,128"


def test_local_repository_takes_an_optional_user_id_and_hands_the_engine_one_per_row(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    package = _package(tmp_path, Variant("eager-fp32", "eager", "fp32", str(checkpoint), "train"))
    cfg = _cfg(tmp_path, "serving.cache.gpu_bytes=1000", "serving.cache.host_bytes=0")
    configs = _configs(write_repository(package, cfg.serving, tmp_path / "repo", 3, "local"))
    inputs = lambda name: {i.name: i for i in configs[name].input}  # noqa: E731
    assert inputs("genrec")["USER_ID"].optional and inputs("genrec_v3_preprocess")["USER_ID"].optional
    engine = inputs("genrec_v3_engine")["USER_ID"]
    assert not engine.optional and list(engine.dims) == [1]  # every engine request carries it: they batch together
    preprocess, engine_step = configs["genrec"].ensemble_scheduling.step[:2]
    assert preprocess.input_map["USER_ID"] == "USER_ID" and engine_step.input_map["USER_ID"] == "user_ids"
    params = {k: v.string_value for k, v in configs["genrec_v3_engine"].parameters.items()}
    assert (params["cache_enabled"], params["cache_gpu_bytes"], params["cache_host_bytes"]) == ("true", "1000", "0")
    assert params["cache_page_size"] == "64"
    assert params["cache_cuda_graphs"] == "true"
    off = _configs(write_repository(package, _cfg(tmp_path, "serving.cache.enabled=false").serving,
                                    tmp_path / "off", 3, "local"))["genrec_v3_engine"]
    assert off.parameters["cache_enabled"].string_value == "false"
    with pytest.raises(PipelineError, match=r"serving.cache.host_bytes=-1: a budget is >= 0 bytes"):
        write_repository(package, _cfg(tmp_path, "serving.cache.host_bytes=-1").serving, tmp_path / "bad", 3, "local")


def test_user_ids_are_one_non_negative_id_per_row():
    from pipeline.serving.models.common import NO_USER, user_ids

    assert user_ids(None, 2).tolist() == [[NO_USER], [NO_USER]]
    assert user_ids(np.array([[7], [0]]), 2).tolist() == [[7], [0]]
    with pytest.raises(RequestError, match=r"negative USER_ID: -3; user ids are >= 0"):
        user_ids(np.array([[-3]]), 1)
    with pytest.raises(RequestError, match=r"USER_ID must be \[batch, 1\], one id per row of HISTORY \(2 rows\)"):
        user_ids(np.array([[7]]), 2)


class _FakeBackend:
    """What engine_torch uses of triton_python_backend_utils: requests, responses, custom metrics."""

    class Metric:
        def __init__(self, family, labels):
            self.family, self.labels, self.value = family, labels, 0.0

        def increment(self, value):
            self.value += value

        def set(self, value):
            self.value = value

    class MetricFamily:
        COUNTER, GAUGE = "counter", "gauge"
        made: list = []

        def __init__(self, name, description, kind):
            self.name, self.metrics = name, []
            _FakeBackend.MetricFamily.made.append(self)

        def Metric(self, labels):  # noqa: N802 (the backend's name)
            self.metrics.append(_FakeBackend.Metric(self, labels))
            return self.metrics[-1]

    class InferenceResponse:
        def __init__(self, outputs=None, error=None):
            self.outputs, self.error = dict(outputs or []), error

    TritonError = str

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request.get(name)

    @classmethod
    def value(cls, name, **labels) -> float:
        return sum(m.value for f in cls.MetricFamily.made if f.name == name for m in f.metrics
                   if labels.items() <= m.labels.items())


def test_engine_batches_hits_misses_and_rows_without_a_user_together(monkeypatch):
    """One execute() of requests the dynamic batcher queued together: a returning user (hit), a new one (miss)
    and a request without USER_ID; each answered as the variant answers, the metrics counting each path."""
    import importlib.util
    import sys

    import torch

    from pipeline.catalogue import VariantSpec, build
    from pipeline.models import HSTU, Retriever
    from pipeline.serving.models import common
    from pipeline.serving.kvcache import IncrementalRetriever, KVCache

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _FakeBackend)
    monkeypatch.setitem(sys.modules, "genrec_common", common)
    spec = importlib.util.spec_from_file_location("genrec_engine_torch", ROOT / "pipeline/serving/models/engine_torch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "to_triton", lambda pb_utils, name, array: (name, array))
    monkeypatch.setattr(module.CacheMetrics, "FLUSH_S", 60.0)  # nothing is sent before close() here

    torch.manual_seed(0)
    max_len = 8
    retriever = Retriever(HSTU(40, max_len, dim=16, num_layers=2, num_heads=2, dropout=0.0, linear_dropout=0.0), k=5).eval()
    engine = module.TritonPythonModel()
    engine.device, engine.buckets, engine.variant, engine.time_bias = torch.device("cpu"), [], "eager-fp32", False
    engine.predict = build(VariantSpec("eager", "fp32"), retriever, engine.device)
    engine.incremental, engine.metrics, why = engine._incremental(
        {"cache_enabled": "true", "cache_gpu_bytes": "100000", "cache_host_bytes": "0", "max_len": str(max_len)}, "m_v1_engine")
    assert why is None

    def request(history, user=None):
        padded = np.zeros((1, max_len), np.int64)
        padded[0, : len(history)] = history
        return {"HISTORY": padded, "LENGTHS": np.array([[len(history)]]),
                "USER_ID": np.array([[common.NO_USER if user is None else user]])}

    first = engine.execute([request([3, 4, 5], user=1)])
    assert first[0].error is None
    batch = [request([3, 4, 5, 6], user=1), request([7, 8], user=2), request([9, 10, 11])]
    responses = engine.execute(batch)
    rows = np.concatenate([r["HISTORY"] for r in batch])
    with torch.inference_mode():
        want_ids, want_scores = retriever(torch.from_numpy(rows), torch.tensor([4, 2, 3]))
    for response, ids, scores in zip(responses, want_ids, want_scores):
        assert response.error is None
        assert response.outputs["TOP_IDS"].tolist() == [ids.tolist()]
        np.testing.assert_allclose(response.outputs["TOP_SCORES"][0], scores.numpy(), atol=1e-5)
    value = _FakeBackend.value
    # Updates are sent in batches (each is a message to the server): none yet, all of them at close.
    assert value("genrec_cache_path_rows", model="m_v1_engine") == value("genrec_cache_misses", model="m_v1_engine") == 0
    engine.finalize()
    assert value("genrec_cache_hits", model="m_v1_engine", tier="device") == 1
    assert value("genrec_cache_misses", model="m_v1_engine") == 2
    assert [value("genrec_cache_path_rows", model="m_v1_engine", path=p) for p in ("miss", "device_hit", "no_user")] == [2, 1, 1]
    assert value("genrec_cache_path_duration_us", model="m_v1_engine", path="device_hit") > 0
    assert value("genrec_cache_entries", model="m_v1_engine", tier="device") == 2
    assert value("genrec_cache_bytes", model="m_v1_engine", tier="device") == engine.incremental.cache.stats()["bytes_device"] > 0

    # An engine that cannot reach the model's modules serves every row with the variant's own call.
    engine.predict = lambda history, lengths, timestamps: retriever(history, lengths)
    assert engine._incremental({"cache_enabled": "true"}, "m")[2] == (
        "eager-fp32 runs an exported artifact: the engine cannot reach the model's modules")
    assert engine._incremental({"cache_enabled": "false"}, "m")[2] == "serving.cache.enabled=false"


def test_cache_metrics_are_read_per_engine_over_an_interval():
    from pipeline.serving.loadtest import cache_side, parse_cache_metrics, report

    def text(hits, misses, rows_hit, us_hit):
        return "\n".join([
            "# HELP genrec_cache_hits Rows answered from the user-state cache, by tier",
            f'genrec_cache_hits{{model="genrec_v2_engine",tier="device"}} {hits}',
            'genrec_cache_hits{model="genrec_v2_engine",tier="host"} 1',
            f'genrec_cache_misses{{model="genrec_v2_engine"}} {misses}',
            'genrec_cache_bytes{model="genrec_v2_engine",tier="device"} 2097152',
            f'genrec_cache_path_rows{{model="genrec_v2_engine",path="device_hit"}} {rows_hit}',
            f'genrec_cache_path_duration_us{{model="genrec_v2_engine",path="device_hit"}} {us_hit}',
            'nv_inference_count{model="genrec",version="2"} 9',
        ])

    before, after = parse_cache_metrics(text(3, 1, 3, 300)), parse_cache_metrics(text(13, 4, 13, 2300))
    got = cache_side(before, after)["genrec_v2_engine"]
    assert (got["hits_device"], got["hits_host"], got["misses"], got["bytes_device"]) == (10, 0, 3, 2097152)
    assert got["paths"]["device_hit"] == {"rows": 10, "mean_ms": 0.2}
    assert got["paths"]["miss"] == {"rows": 0, "mean_ms": None}
    client = {"ok": 13, "requests": 13, "errors": 0, "concurrency": 2, "protocol": "http", "k": 10,
              "throughput_rps": 50.0, "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0, "first_errors": []}
    lines = report({"version": "2", "variant": "eager-fp32", "client": client, "server": {},
                    "returning_users": {"users": 100, "visited": 9, "cache": cache_side(before, after)}})
    assert "hits device 10, host 0; misses 3" in lines and "device_hit        10 rows, engine 0.200 ms" in lines


def test_loadtest_report_splits_a_request_between_client_server_and_engine():
    from pipeline.serving.loadtest import report, server_side

    def counters(n, request_us, compute_us):
        out = {}
        for model, req, comp in (("genrec", request_us, 0.0), ("genrec_v2_engine", 0.7 * request_us, compute_us)):
            out.update({("request_success", model): n, ("request_failure", model): 0, ("count", model): n,
                        ("exec_count", model): n, ("queue_duration_us", model): 0.0,
                        ("compute_infer_duration_us", model): comp, ("request_duration_us", model): req})
        return out

    server = server_side(counters(10, 1000.0, 500.0), counters(110, 251000.0, 100500.0))
    assert server["genrec"]["request_ms"] == pytest.approx(2.5) and server["genrec_v2_engine"]["compute_ms"] == 1.0
    client = {"ok": 100, "requests": 100, "errors": 0, "concurrency": 1, "protocol": "http", "k": 10,
              "throughput_rps": 250.0, "p50_ms": 3.9, "p90_ms": 4.0, "p99_ms": 5.0, "mean_ms": 4.0, "first_errors": []}
    lines = report({"version": "2", "variant": "eager-fp32", "model": "genrec", "client": client, "server": server})
    assert ("per request (means): client 4.000 ms = outside the server 1.500 + in the server 2.500 ms "
            "(engine compute 1.000 ms, other steps and hops 1.500 ms)") in lines


def test_fused_repository_is_one_python_model_taking_ragged_histories(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    package = _package(tmp_path, Variant("eager-fp32", "eager", "fp32", str(checkpoint), "train"))
    folders = write_repository(package, _cfg(tmp_path, "serving.fused=true").serving, tmp_path / "repo", 7, "local")
    configs = _configs(folders)
    assert set(configs) == {"genrec", "genrec_v7", "genrec_v7_engine"}
    for name in ("genrec", "genrec_v7"):  # the ensembles keep their names (blue/green switch, smoke test), one step
        steps = configs[name].ensemble_scheduling.step
        assert [(s.model_name, s.model_version) for s in steps] == [("genrec_v7_engine", 7)]
        assert dict(steps[0].input_map) == {"HISTORY": "HISTORY", "K": "K", "USER_ID": "USER_ID"}
        assert dict(steps[0].output_map) == {"ITEM_IDS": "ITEM_IDS", "SCORES": "SCORES"}
    engine = configs["genrec_v7_engine"]
    inputs = {i.name: i for i in engine.input}
    assert list(inputs) == ["HISTORY", "K", "USER_ID"] and inputs["USER_ID"].optional
    assert inputs["HISTORY"].allow_ragged_batch and list(inputs["HISTORY"].dims) == [-1]
    assert [o.name for o in engine.output] == ["ITEM_IDS", "SCORES"]
    assert engine.backend == "python" and list(engine.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert engine.parameters["cache_enabled"].string_value == "true"
    engine_dir = folders["genrec_v7_engine"] / "7"
    assert (engine_dir / "model.py").read_text() == (ROOT / "pipeline/serving/models/fused.py").read_text()
    assert (engine_dir / "genrec_engine.py").read_text() == (ROOT / "pipeline/serving/models/engine_torch.py").read_text()
    assert {"genrec_common.py", "item_ids.npy", "variant.json", "model.pt"} <= {p.name for p in engine_dir.iterdir()}
    assert len(list((engine_dir / "__pycache__").glob("*.pyc"))) == 3
    model = _tiny_onnx(tmp_path / "retriever-fp32.onnx")
    write_digest(model)
    onnx_package = write_package(tmp_path / "pkg2", Variant("onnxruntime-fp32", "onnxruntime", "fp32", str(model), "onnx"),
                                 model_config={"name": "hstu", "max_len": 8}, top_k=20, raw_item_ids=RAW,
                                 examples=[[10, 20]], info={"metrics": {}})
    with pytest.raises(PipelineError, match="serving.fused=true needs a python engine.*native onnxruntime backend"):
        write_repository(onnx_package, _cfg(tmp_path, "serving.fused=true").serving, tmp_path / "prod", 3, "production")


def test_fused_layout_by_default_wherever_the_engine_is_a_python_one(tmp_path):
    from pipeline.serving.repository import Engine, fused_layout

    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    package = _package(tmp_path, Variant("eager-fp32", "eager", "fp32", str(checkpoint), "train"))
    cfg = load_config([f"artifacts_dir={tmp_path / 'artifacts'}", "validate.top_k=20"])
    assert cfg.serving.fused == "auto"
    assert set(_configs(write_repository(package, cfg.serving, tmp_path / "repo", 2, "local"))) == {
        "genrec", "genrec_v2", "genrec_v2_engine"}
    native, python = Engine("onnxruntime", (), ()), Engine("python_onnxruntime", (), ())
    assert (fused_layout("auto", native), fused_layout("auto", python)) == (False, True)
    assert (fused_layout(False, python), fused_layout(True, python)) == (False, True)
    with pytest.raises(PipelineError, match="serving.fused must be auto, true or false, got 'yes'"):
        fused_layout("yes", python)


@pytest.mark.parametrize("time_bias", [False, True])
@pytest.mark.parametrize("text", [False, True])
def test_a_batch_of_requests_is_checked_and_mapped_as_each_request_alone(text, time_bias):
    """The fused engine checks a batch's requests together; each request must get what Request gives it alone:
    the same padded ids, lengths, users and times, or the same error, whatever the others hold."""
    from pipeline.serving.models.common import Batch, Request

    vocab = Vocabulary(np.array(["", "30", "10", "20", "40"]) if text else RAW)
    ids = (lambda rows: pack_text(rows)) if text else (lambda rows: np.array(rows))
    inputs = [
        (ids([[10, 40]]), np.array([[2]]), None, np.array([[5, 6]])),
        (ids([[30], [20]]), np.array([[1], [1]]), np.array([[7], [8]]), np.array([[1], [2]])),
        (ids([[10, 99]]), np.array([[2]]), None, np.array([[1, 2]])),       # unknown id 99
        (ids([[20, 30, 10]]), np.array([[3]]), np.array([[4]]), np.array([[1, 2, 3]])),
        (ids([[10]]), np.array([[9]]), None, np.array([[1]])),              # k out of range
        (ids([[40]]), np.array([[1]]), np.array([[-2]]), np.array([[1]])),  # negative user id
    ]
    batch = Batch(vocab, inputs, max_len=4, max_k=5, time_bias=time_bias)
    start, good = 0, iter(batch.good)
    for i, one in enumerate(inputs):
        try:
            alone = Request(vocab, *one[:3], one[3] if time_bias else None, max_len=4, max_k=5, time_bias=time_bias)
        except RequestError as err:
            assert str(batch.errors[i]) == str(err)
            continue
        assert batch.errors[i] is None
        index, rows, k = next(good)
        assert (index, rows, k) == (i, alone.rows, alone.k)
        assert batch.history[start:start + rows].tolist() == alone.history.tolist()
        assert batch.lengths[start:start + rows].tolist() == alone.lengths.tolist()
        assert batch.users[start:start + rows].tolist() == alone.users.tolist()
        if time_bias:
            assert batch.times[start:start + rows].tolist() == alone.times.tolist()
        start += rows
    assert [i for i, _, _ in batch.good] == [0, 1, 3] and start == len(batch.history) == 4
    assert "unknown item ids (1): 99" in str(batch.errors[2]) and "k=9" in str(batch.errors[4])


def test_request_and_answer_are_what_preprocess_and_postprocess_compute():
    from pipeline.serving.models.common import Request, answer

    vocab = Vocabulary(RAW)
    request = Request(vocab, np.array([[10, 40]]), np.array([[2]]), None, None, max_len=4, max_k=20, time_bias=False)
    assert request.history.tolist() == [[2, 4, 0, 0]] and request.lengths.tolist() == [[2]]
    assert request.users.tolist() == [[-1]] and request.times is None and request.k == 2 and request.rows == 1
    timed = Request(vocab, np.array([[10]]), np.array([[1]]), np.array([[7]]), np.array([[99]]), 3, 20, True)
    assert timed.users.tolist() == [[7]] and timed.times.tolist() == [[99, 0, 0]]
    with pytest.raises(RequestError, match="send TIMESTAMPS"):
        Request(vocab, np.array([[10]]), np.array([[1]]), None, None, 3, 20, True)
    with pytest.raises(RequestError, match="negative USER_ID"):
        Request(vocab, np.array([[10]]), np.array([[1]]), np.array([[-3]]), None, 3, 20, False)
    raw, scores = answer(vocab, np.array([[4, 1, 2]]), np.array([[3.0, 2.0, 1.0]], np.float64), 2)
    assert raw.tolist() == [[40, 30]] and scores.dtype == np.float32 and scores.tolist() == [[3.0, 2.0]]


def _smoke_package(precision: str):
    """A package stand-in for deploy's smoke test: its 'pipeline answer' to a history is a function of it."""
    def recommend(predict, history, k, device, times=None):
        ids = np.array(sorted(history, reverse=True)[:k] + [-1] * max(0, k - len(history)))
        return ids, np.linspace(1.0, 0.5, k).astype(np.float32) + 0.01 * len(history)

    examples = [[5, 9, 2], [7], [1, 4]]
    return SimpleNamespace(load=lambda device: None, examples=examples, example=lambda i: (examples[i], None),
                           time_bias=False, example_timestamps=None, recommend=recommend,
                           variant=SimpleNamespace(precision=precision))


@pytest.mark.parametrize("broken", [False, True])
def test_smoke_test_sends_returning_users_and_refuses_a_wrong_cached_answer(monkeypatch, broken):
    from pipeline.serving.client import Recommendation
    from pipeline.stages import deploy

    package, sent = _smoke_package("fp32"), []

    class Client:  # answers as the pipeline; with `broken`, a user's second visit (its cached state) differs
        def __init__(self, url, model):
            self.seen = set()

        def recommend(self, history, k, user_id=None, timestamps=None):
            sent.append((list(history), user_id))
            ids, scores = package.recommend(None, history, k, None)
            if broken and user_id is not None and user_id in self.seen:
                ids = ids[::-1].copy()
            self.seen.add(user_id)
            return Recommendation(ids, scores, "3")

        def close(self):
            pass

    monkeypatch.setattr(deploy, "GenrecClient", Client)
    smoke = SimpleNamespace(examples=3, k=2, atol=1e-4)
    check = deploy._smoke_test(package, SimpleNamespace(url="x"), "3", smoke, "cpu", returning=True)
    if broken:
        with pytest.raises(PipelineError, match=rf"returning user, USER_ID {deploy.SMOKE_USER_ID}, 3 actions\) "
                                                r"differs from the pipeline's: item at rank 1"):
            check("genrec")
    else:
        check("genrec")
        # Every history as it is, then each one of two actions or more without its last action and whole, under one
        # id per history ([7] has no earlier visit to send).
        user = deploy.SMOKE_USER_ID
        assert sent == [([5, 9, 2], None), ([7], None), ([1, 4], None),
                        ([5, 9], user), ([5, 9, 2], user), ([1], user + 2), ([1, 4], user + 2)]
    sent.clear()
    deploy._smoke_test(_smoke_package("fp16"), SimpleNamespace(url="x"), "3", smoke, "cpu", returning=True)("genrec")
    assert all(user is None for _, user in sent)  # 16 bits: only the plain requests
