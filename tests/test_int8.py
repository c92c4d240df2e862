"""The int8 stage: the seeded calibration set from the training split, the calibration cache (determinism,
reuse, refusal of a corrupt or mismatched cache), the ONNX Runtime QDQ model with its gate, the sensitivity
sweep, torchao's PT2E path on the CPU, and stage runs where a variant built to fail is never promoted."""
import json
import re

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, TINY, run_pipeline, seed_store
from pipeline.checkpoint import save_checkpoint
from pipeline.core import PipelineError
from pipeline.data import generate_synthetic, leave_one_out
from pipeline.evaluation import parity, predict_top_k, top_k_metrics
from pipeline.export.onnx import CPU, OnnxRetriever, export_onnx
from pipeline.models import HSTU
from pipeline.quant import onnx_qdq, torchao_pt2e
from pipeline.core import file_digest
from pipeline.quant.calibration import CalibrationCache, sample_calibration
from pipeline.gates import check, gate_for, load_gates
from pipeline.variants import build_retriever

NUM_ITEMS, MAX_LEN, K = 60, 12, 20
MODEL_CFG = {"name": "hstu", "max_len": MAX_LEN, "dim": 16, "num_layers": 2, "num_heads": 2}
QDQ = OmegaConf.load(ROOT / "conf" / "int8" / "default.yaml").onnx_qdq
INT8_GATES = gate_for(load_gates(), "int8")
CPU_DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def splits():
    return leave_one_out(generate_synthetic(num_users=150, num_items=NUM_ITEMS, min_len=6, max_len=20, seed=0), MAX_LEN)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = HSTU(NUM_ITEMS, MAX_LEN, dim=16, num_layers=2, num_heads=2)
    return str(save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", model, MODEL_CFG, NUM_ITEMS))


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("onnx")
    export = export_onnx(build_retriever(checkpoint, K, "fp32", CPU_DEVICE), out / "retriever-fp32.onnx", None, 1024)
    return onnx_qdq.preprocess(export.path, out / "pre.onnx")


@pytest.fixture(scope="module")
def calib(splits):
    return sample_calibration(splits.train, 64, seed=0, max_len=MAX_LEN)


@pytest.fixture(scope="module")
def reference(splits, checkpoint):
    ids, scores = predict_top_k(build_retriever(checkpoint, K, "fp32", CPU_DEVICE), splits.test, 256, CPU_DEVICE)
    return ids, scores


def settings(method="minmax"):
    return onnx_qdq.QdqSettings.from_config(QDQ, method)


def measure(predict, splits, reference) -> dict[str, float]:
    """What validate computes for a variant: HR@10 delta and top-K overlap with fp32 eager on the test split."""
    ids, scores = predict_top_k(predict, splits.test, 256, CPU_DEVICE)
    metrics = parity(ids, scores, *reference)
    metrics["hr10_delta"] = (top_k_metrics(ids, splits.test.target, ks=(10,))["hr10"]
                             - top_k_metrics(reference[0], splits.test.target, ks=(10,))["hr10"])
    return metrics


def test_calibration_set_is_seeded_and_comes_from_the_training_split(splits, calib):
    again = sample_calibration(splits.train, 64, seed=0, max_len=MAX_LEN)
    other = sample_calibration(splits.train, 64, seed=1, max_len=MAX_LEN)
    assert calib.size == 64 and calib.digest == again.digest and torch.equal(calib.users, again.users)
    assert other.digest != calib.digest
    for row, user in enumerate(calib.users.tolist()):  # the input part of that user's training sequence
        n = int(calib.lengths[row])
        full = splits.train.items[user, : int(splits.train.lengths[user]) - 1]
        assert torch.equal(calib.history[row, :n], full[-n:]) and not calib.history[row, n:].any()
    everyone = sample_calibration(splits.train, 10_000, seed=0, max_len=MAX_LEN)
    assert everyone.size == splits.train.lengths.shape[0]
    with pytest.raises(PipelineError, match="num_users"):
        sample_calibration(splits.train, 0, seed=0, max_len=MAX_LEN)


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_calibration_is_deterministic_and_the_cache_round_trips(tmp_path, fp32_onnx, splits, method):
    ranges = [onnx_qdq.calibrate(fp32_onnx, sample_calibration(splits.train, 64, 0, MAX_LEN), method, QDQ.op_types, 32)
              for _ in range(2)]
    assert ranges[0] == ranges[1] and len(ranges[0]) > 4
    assert all(lo <= hi for lo, hi in ranges[0].values())
    caches = [CalibrationCache("onnx_qdq", method, "m", "d", 64, 0, r).save(tmp_path / f"c{i}.json") for i, r in enumerate(ranges)]
    assert caches[0].read_bytes() == caches[1].read_bytes()
    assert CalibrationCache.load(caches[0]).ranges == ranges[0]


def test_cache_refuses_mismatch_and_corrupt_files(tmp_path, fp32_onnx, calib):
    cache = CalibrationCache("onnx_qdq", "minmax", file_digest([fp32_onnx]), calib.digest, calib.size, calib.seed,
                             {"x": [-1.0, 1.0]})
    path = cache.save(tmp_path / "cache.json")
    loaded = CalibrationCache.load(path)
    loaded.check(kind="onnx_qdq", model_digest=file_digest([fp32_onnx]), data_digest=calib.digest, method="minmax", source="t")
    with pytest.raises(PipelineError, match="model digest .*another model"):
        loaded.check(kind="onnx_qdq", model_digest="0" * 64, data_digest=calib.digest, method="minmax", source="t")
    with pytest.raises(PipelineError, match="calibration data digest"):
        loaded.check(kind="onnx_qdq", model_digest=cache.model_digest, data_digest="f" * 64, method="minmax", source="t")
    with pytest.raises(PipelineError, match="method minmax != entropy"):
        loaded.check(kind="onnx_qdq", model_digest=cache.model_digest, data_digest=calib.digest, method="entropy", source="t")
    (tmp_path / "truncated.json").write_text(path.read_text()[:40])
    with pytest.raises(PipelineError, match="not valid JSON"):
        CalibrationCache.load(tmp_path / "truncated.json")
    raw = json.loads(path.read_text())
    (tmp_path / "inverted.json").write_text(json.dumps({**raw, "ranges": {"x": [1.0, -1.0]}}))
    with pytest.raises(PipelineError, match="malformed ranges"):
        CalibrationCache.load(tmp_path / "inverted.json")
    (tmp_path / "other.json").write_text(json.dumps({"data": {}}))
    with pytest.raises(PipelineError, match="format"):
        CalibrationCache.load(tmp_path / "other.json")


def test_qdq_model_runs_in_onnxruntime_and_passes_the_int8_gate(tmp_path, fp32_onnx, calib, splits, reference):
    import onnx

    ranges = onnx_qdq.calibrate(fp32_onnx, calib, "minmax", QDQ.op_types, 32)
    keep = onnx_qdq.keep_float_nodes(fp32_onnx, ["scoring"])
    assert len(keep) == 1
    path = onnx_qdq.quantize(fp32_onnx, tmp_path / "int8.onnx", ranges, settings(), nodes_to_exclude=keep)
    graph = onnx.load(str(path)).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) >= 4
    produced_by = {out: n.op_type for n in graph.node for out in n.output}
    (scoring,) = [n for n in graph.node if n.name == keep[0]]
    assert scoring.op_type == "MatMul" and all(produced_by.get(i) != "DequantizeLinear" for i in scoring.input)
    metrics = measure(OnnxRetriever(path, CPU, 2), splits, reference)
    passed, why = check(metrics, INT8_GATES)
    assert passed, (why, metrics)
    assert 0.97 <= metrics["parity_topk_overlap"] < 1.0  # it is really quantized, and close

    # The same ranges through a saved cache give the same model, without calibrating.
    cache = CalibrationCache("onnx_qdq", "minmax", "m", calib.digest, calib.size, calib.seed, ranges).save(tmp_path / "c.json")
    again = onnx_qdq.quantize(fp32_onnx, tmp_path / "again.onnx", CalibrationCache.load(cache).ranges, settings(),
                              nodes_to_exclude=keep)
    assert again.read_bytes() == path.read_bytes()


def test_absurd_ranges_fail_the_gate_and_the_sweep_names_the_costly_layer(tmp_path, fp32_onnx, calib, splits, reference):
    ranges = onnx_qdq.calibrate(fp32_onnx, calib, "minmax", QDQ.op_types, 32)
    keep = onnx_qdq.keep_float_nodes(fp32_onnx, ["scoring"])
    squeezed = {name: [lo * 1e-3, hi * 1e-3] for name, (lo, hi) in ranges.items()}
    broken = onnx_qdq.quantize(fp32_onnx, tmp_path / "broken.onnx", squeezed, settings(), nodes_to_exclude=keep)
    metrics = measure(OnnxRetriever(broken, CPU, 2), splits, reference)
    passed, why = check(metrics, INT8_GATES)
    assert not passed and "top-K overlap" in why, metrics

    # Break one layer's ranges only: the sweep must put that layer first, well ahead of the others.
    nodes = onnx_qdq.quantizable_nodes(fp32_onnx, QDQ.op_types, keep)
    import onnx

    graph = onnx.load(str(fp32_onnx)).graph
    target = next(n for n in graph.node if n.name == nodes[0][0])
    one_bad = {**ranges, **{t: [r * 1e-3 for r in ranges[t]] for t in (target.input[0], target.output[0]) if t in ranges}}
    rows = onnx_qdq.sensitivity_sweep(fp32_onnx, tmp_path, one_bad, settings(), keep,
                                      lambda p: {"topk_overlap": measure(OnnxRetriever(p, CPU, 2), splits, reference)["parity_topk_overlap"],
                                                 "hr10_delta": 0.0})
    assert [r["node"] for r in rows][0] == target.name and len(rows) == len(nodes)
    assert keep[0] not in {r["node"] for r in rows}
    assert rows[0]["overlap_loss"] > 2 * max(r["overlap_loss"] for r in rows[1:]), rows
    assert not list(tmp_path.glob("single-*"))


def test_keep_float_patterns(fp32_onnx):
    assert onnx_qdq.keep_float_nodes(fp32_onnx, [r"layers\.0\.uvqk"])
    with pytest.raises(PipelineError, match="matches no node"):
        onnx_qdq.keep_float_nodes(fp32_onnx, ["no_such_layer"])
    with pytest.raises(PipelineError, match="not a regular expression"):
        onnx_qdq.keep_float_nodes(fp32_onnx, ["("])


@pytest.mark.skipif(torchao_pt2e.unavailable_reason() is not None, reason=str(torchao_pt2e.unavailable_reason()))
def test_torchao_pt2e_on_cpu(tmp_path, checkpoint, calib, splits, reference):
    converted, cache, names = torchao_pt2e.build(checkpoint, K, calib, 32, None)
    targets = {str(n.target) for n in converted.graph.nodes if n.op == "call_function"}
    assert any("quantize_per_tensor" in t for t in targets) and any("dequantize_per_channel" in t for t in targets)
    assert cache.kind == "torchao_pt2e" and cache.data_digest == calib.digest and cache.ranges
    assert cache.model_digest == file_digest([checkpoint])

    # The cache rebuilds the same int8 graph without calibrating (a loader has no calibration data).
    path = cache.save(tmp_path / "calibration.json")
    rebuilt, _, _ = torchao_pt2e.build(checkpoint, K, calib, 32, CalibrationCache.load(path))
    sample = splits.test.history[:64], splits.test.lengths[:64]
    with torch.no_grad():
        for a, b in zip(converted(*sample), rebuilt(*sample)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    metrics = measure(torchao_pt2e.TorchaoRetriever(rebuilt, names), splits, reference)  # torch.compile, oneDNN int8
    passed, why = check(metrics, INT8_GATES)
    assert passed, (why, metrics)
    assert metrics["parity_topk_overlap"] < 1.0 or metrics["parity_max_abs_err"] > 0

    other = cache.extra["qparams"]
    cache.extra = {"qparams": dict(list(other.items())[:-1])}
    with pytest.raises(PipelineError, match="another graph"):
        torchao_pt2e.build(checkpoint, K, calib, 32, cache)


@pytest.mark.slow
def test_stage_builds_int8_variants_and_a_variant_built_to_fail_is_never_promoted(tmp_path, store_template):
    from mlflow import MlflowClient

    artifacts = seed_store(store_template, tmp_path / "artifacts").parent
    common = [*TINY, f"artifacts_dir={artifacts}", "precision=int8", "int8.torchao.enabled=false",
              "promote.policy=lowest_p99", "promote.batch_size=1"]
    first = run_pipeline([*common, "stage=[train,onnx,int8,validate,promote]"], cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    client = MlflowClient(f"sqlite:///{artifacts / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("genrec").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    int8_run = runs["int8"]
    (dataset,) = int8_run.inputs.dataset_inputs
    assert dataset.dataset.name == "synthetic-calibration" and len(dataset.dataset.digest) == 16
    assert "calibration" in {t.value for t in dataset.tags}
    assert int8_run.data.tags["calibration_cache_onnx_qdq"] == "calibrated"
    assert "int8_table-triton-int8: " in int8_run.data.tags["skipped_variants"]
    logged = {a.path for a in client.list_artifacts(int8_run.info.run_id)}
    assert {"sensitivity.md", "sensitivity.csv", "calibration-onnx_qdq.json", "retriever-int8-qdq.onnx"} <= logged
    variant = runs["variant:onnxruntime-int8"].data
    assert variant.metrics["gate_min_topk_overlap"] == 0.97 and variant.metrics["gate_max_hr10_drop"] == 0.005
    assert variant.metrics["latency_p50_ms_b1"] > 0 and "gate_passed" in variant.metrics
    assert runs["variant:onnxruntime-fp32"].data.metrics["gate_min_topk_overlap"] == 0.99

    # The same model and data with a cache whose ranges are absurd: reused as given, the variant fails the
    # quick check of its gate in the int8 stage; the run goes on without it (validate lists it as failed)
    # and promote never takes it.
    run_dir = next((artifacts / "runs").glob("*/int8")).parent
    raw = json.loads((run_dir / "int8" / "calibration-onnx_qdq.json").read_text())
    raw["ranges"] = {name: [lo * 1e-3, hi * 1e-3] for name, (lo, hi) in raw["ranges"].items()}
    absurd = tmp_path / "absurd.json"
    absurd.write_text(json.dumps(raw))
    second = run_pipeline([*common, "stage=[int8,validate,promote]", f"from_run={run_dir.name}",
                           f"int8.calibration.cache={absurd}", "int8.sensitivity.enabled=false"], cwd=tmp_path)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output
    assert re.search(r"onnxruntime-int8: against fp32 eager on \d+ test users, top-K overlap 0\.\d+ < 0\.97 "
                     r"\(gates\.int8\.min_topk_overlap\)", output), output
    (results,) = [json.loads(p.read_text()) for p in (artifacts / "runs").glob("*/validate_variants.json")
                  if p.parent.name != run_dir.name]
    (failed,) = [r for r in results if r["variant"]["name"] == "onnxruntime-int8"]
    assert failed["failed"] and not failed["gate_passed"] and failed["gate_reason"].startswith("failed in int8: ")
    # The first run's int8 variant, calibrated, may be the fastest at batch 1 and registered: any onnxruntime-int8
    # in the registry must be that one, never the second run's.
    assert all(v.tags["source_run"] == run_dir.name for v in client.search_model_versions("name = 'genrec'")
               if v.tags["variant"] == "onnxruntime-int8")
    runs = client.search_runs([experiment], filter_string="attributes.run_name = 'int8'", order_by=["attributes.start_time DESC"])
    assert runs[0].data.tags["calibration_cache_onnx_qdq"] == f"reused {absurd}"

    # A cache made for another model is refused with a clear message.
    raw["model_digest"] = "0" * 64
    absurd.write_text(json.dumps(raw))
    third = run_pipeline([*common, "stage=[int8]", f"from_run={run_dir.name}", f"int8.calibration.cache={absurd}"], cwd=tmp_path)
    assert third.returncode == 1 and "does not match this run: model digest" in third.stdout + third.stderr
