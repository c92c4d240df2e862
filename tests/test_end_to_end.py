"""stage=all on a tiny synthetic config, then the sqlite store (made by the run itself) read back with the
MLflow client: the nested stage runs, the onnx stage's ONNX Runtime variant that validate measures, trt skipped."""
import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import run_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    artifacts = tmp / "artifacts"
    from conftest import TINY

    args = [*TINY, f"artifacts_dir={artifacts}", "stage=all", "precision=fp16"]
    result = run_pipeline(args, cwd=tmp)
    assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(f"sqlite:///{artifacts / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("genrec")
    runs = client.search_runs([experiment.experiment_id])
    return tmp, artifacts, client, runs


def _children(runs, parent_id):
    return {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}


def test_one_parent_run_with_nested_stage_runs(finished_run):
    _, artifacts, client, runs = finished_run
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["model.name"] == "hstu"
    assert parent.data.params["precision"] == "fp16"
    assert parent.data.params["model.dim"] == "16"
    assert parent.data.tags["status"] == "ok"
    assert parent.data.tags["torch_version"]
    assert parent.data.tags["has_checkpoint"] == "true"
    stages = _children(runs, parent.info.run_id)
    assert set(stages) == {"train", "compile", "trt", "onnx", "int8", "validate", "promote"}
    for name, run in stages.items():
        if name == "trt" and run.data.tags["status"] == "skipped":  # no CUDA or no TensorRT here
            assert "TensorRT cannot run here" in run.data.tags["skip_reason"]
        elif name == "int8":  # INT8 variants only for precision=int8
            assert run.data.tags["status"] == "skipped" and "precision=fp16" in run.data.tags["skip_reason"]
        else:
            assert run.data.tags["status"] == "ok"
        assert run.data.metrics["stage_seconds"] > 0
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "manifest.json"} <= names


def test_train_run_metrics_history_and_checkpoint(finished_run):
    _, _, client, runs = finished_run
    train = next(r for r in runs if r.info.run_name == "train")
    for key in ("hr10", "ndcg10", "hr50", "ndcg50", "hr200", "ndcg200", "valid_hr10"):
        assert 0.0 <= train.data.metrics[key] <= 1.0, key
    history = client.get_metric_history(train.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
    assert all(m.value > 0 for m in history)
    assert "model.pt" in {a.path for a in client.list_artifacts(train.info.run_id)}


def test_validate_nested_variant_runs(finished_run):
    tmp, _, client, runs = finished_run
    validate = next(r for r in runs if r.info.run_name == "validate")
    variants = _children(runs, validate.info.run_id)
    assert set(variants) == {"variant:eager-fp32", "variant:eager-fp16", "variant:inductor-fp32",
                             "variant:onnxruntime-fp32", "variant:onnxruntime-fp16"}
    ref = variants["variant:eager-fp32"].data
    assert ref.metrics["parity_topk_overlap"] == pytest.approx(1.0)
    assert ref.metrics["parity_max_abs_err"] == 0.0
    for run in variants.values():
        for key in ("hr10", "latency_p50_ms_b1", "latency_p99_ms_b8", "users_per_s_b8"):
            assert run.data.metrics[key] >= 0, key
        assert run.data.tags["backend"] == run.data.tags["variant"].split("-")[0]
    # the half-precision twin answers nearly the same top-K
    assert variants["variant:eager-fp16"].data.metrics["parity_topk_overlap"] > 0.8
    # Returning users as the engine answers them (from the cached state of their previous visit), for the
    # variants the engine serves with its cache; ONNX Runtime has no modules to cache from.
    for name in ("eager-fp32", "inductor-fp32", "eager-fp16"):
        metrics = variants[f"variant:{name}"].data.metrics
        assert metrics["returning_hit_share"] == 1.0, name  # every answer came from the cache
        assert metrics["returning_topk_overlap"] >= 0.99, name
    assert variants["variant:eager-fp32"].data.metrics["returning_max_abs_err"] < 1e-4
    assert "returning_topk_overlap" not in variants["variant:onnxruntime-fp32"].data.metrics
    artifacts = {a.path for a in client.list_artifacts(validate.info.run_id)}
    assert {"validate_variants.csv", "validate_variants.md", "latency_vs_batch.png"} <= artifacts
    table = client.download_artifacts(validate.info.run_id, "validate_variants.md", str(tmp))
    header = open(table).readline()
    assert "latency_p50_ms_b1 | latency_p99_ms_b1 | latency_p50_ms_b8 |" in header  # every batch of the sweep
    assert "| eager-fp16 | " in open(table).read().split("Returning users as the serving engine answers them")[1]
    # Hydra wrote nothing into the working directory: everything goes under artifacts_dir.
    assert not (tmp / "outputs").exists()


def test_onnx_stage_yields_the_onnx_runtime_variant_and_trt_is_skipped(finished_run):
    _, artifacts, client, runs = finished_run
    by_name = {r.info.run_name: r for r in runs}

    onnx_run = by_name["onnx"].data
    assert onnx_run.tags["status"] == "ok"
    assert onnx_run.metrics["parity_topk_overlap_fp32"] >= 0.999 and onnx_run.metrics["onnx_nodes_fp32"] > 0
    assert onnx_run.metrics["export_seconds_fp32"] > 0 and onnx_run.metrics["onnx_opset_fp32"] >= 18
    logged = {a.path for a in client.list_artifacts(by_name["onnx"].info.run_id)}
    assert {"retriever-fp32.onnx", "exports.json"} <= logged

    trt_run = by_name["trt"].data
    assert trt_run.tags["status"] == "skipped"
    assert "TensorRT cannot run here" in trt_run.tags["skip_reason"], trt_run.tags

    variant = by_name["variant:onnxruntime-fp32"].data
    assert variant.tags["backend"] == "onnxruntime"
    assert variant.metrics["parity_topk_overlap"] >= 0.999
    assert variant.metrics["latency_p50_ms_b1"] > 0 and variant.metrics["users_per_s_b8"] > 0

    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    manifest = json.loads((artifacts / "runs" / parent.info.run_id / "manifest.json").read_text())
    onnx_variants = {v["name"]: v for v in manifest["stages"]["onnx"]["variants"]}
    assert set(onnx_variants) == {"onnxruntime-fp32", "onnxruntime-fp16"}  # precision=fp16: its fp32 reference too
    for onnx_variant in onnx_variants.values():
        assert onnx_variant["backend"] == "onnxruntime" and onnx_variant["options"]["top_k"] == 20
    assert manifest["stages"]["trt"]["status"] == "skipped" and not manifest["stages"]["trt"]["variants"]


def test_later_invocation_picks_up_the_checkpoint(finished_run):
    tmp, artifacts, client, runs = finished_run
    from conftest import TINY

    result = run_pipeline([*TINY, f"artifacts_dir={artifacts}", "stage=validate", "precision=fp32"], cwd=tmp)
    assert result.returncode == 0, result.stdout + result.stderr
    first_parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    experiment = client.get_experiment_by_name("genrec")
    newest = client.search_runs(
        [experiment.experiment_id], filter_string="tags.stages = 'validate'", order_by=["attributes.start_time DESC"]
    )[0]
    assert newest.data.tags["from_run"] == first_parent.info.run_id
    manifest = json.loads(Path(client.download_artifacts(newest.info.run_id, "manifest.json", str(tmp))).read_text())
    assert "validate" in manifest["stages"] and "train" in manifest["stages"]


def test_earlier_run_with_another_model_config_is_refused(finished_run):
    tmp, artifacts, client, runs = finished_run
    from conftest import TINY

    first_parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("stages") != "validate")
    args = [*TINY, f"artifacts_dir={artifacts}", "stage=validate", "model.dim=32", f"from_run={first_parent.info.run_id}"]
    result = run_pipeline(args, cwd=tmp)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "dim: run=16 config=32" in output, output
