"""promote: the policies, then a real run on a tiny config with a sqlite MLflow store: the champion is
registered with its tags and package, promoting the same variant again registers nothing, and a run
where nothing passes its gates is refused."""
import json
from types import SimpleNamespace

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import TINY, run_pipeline, seed_store
from pipeline.core import PipelineError
from pipeline.serving.package import read_package
from pipeline.stages.promote import lowest_p99, max_throughput


def _result(name, passed=True, **latency):
    """latency: b1=(p99 ms, users/s), ..."""
    metrics = {}
    for key, (p99, users) in latency.items():
        metrics[f"latency_p99_ms_{key}"], metrics[f"users_per_s_{key}"] = p99, users
    return {"variant": {"name": name}, "metrics": metrics, "gate_passed": passed}


CANDIDATES = [
    _result("eager-fp32", b1=(2.0, 500), b64=(9.0, 7000)),
    _result("onnxruntime-fp32", b1=(0.8, 1250), b64=(30.0, 2100)),
]


def test_lowest_p99_at_the_configured_batch_size():
    chosen, why = lowest_p99(CANDIDATES, SimpleNamespace(batch_size=1))
    assert chosen["variant"]["name"] == "onnxruntime-fp32" and "0.800 ms" in why
    chosen, _ = lowest_p99(CANDIDATES, SimpleNamespace(batch_size=64))
    assert chosen["variant"]["name"] == "eager-fp32"
    with pytest.raises(PipelineError, match=r"batch_size=16 was not measured.*\[1, 64\]"):
        lowest_p99(CANDIDATES, SimpleNamespace(batch_size=16))


def test_highest_throughput_under_a_latency_budget():
    chosen, why = max_throughput(CANDIDATES, SimpleNamespace(latency_budget_ms=10.0))
    assert chosen["variant"]["name"] == "eager-fp32" and "7000 users/s at batch 64" in why
    chosen, _ = max_throughput(CANDIDATES, SimpleNamespace(latency_budget_ms=5.0))
    assert chosen["variant"]["name"] == "onnxruntime-fp32"
    with pytest.raises(PipelineError, match="keeps p99 under promote.latency_budget_ms=0.1"):
        max_throughput(CANDIDATES, SimpleNamespace(latency_budget_ms=0.1))


@pytest.fixture(scope="module")
def promoted(tmp_path_factory, store_template):
    tmp = tmp_path_factory.mktemp("promote")
    seed_store(store_template, tmp / "artifacts")
    args = [*TINY, f"artifacts_dir={tmp / 'artifacts'}", "precision=fp32"]
    result = run_pipeline([*args, "stage=[train,validate,promote]"], cwd=tmp)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp, args, MlflowClient(f"sqlite:///{tmp / 'artifacts' / 'mlflow.db'}")


@pytest.mark.slow
def test_champion_is_registered_with_tags_and_package(promoted):
    tmp, _, client = promoted
    version = client.get_model_version_by_alias("genrec", "champion")
    assert str(version.version) == "1"
    tags = version.tags
    assert (tags["variant"], tags["backend"], tags["precision"]) == ("eager-fp32", "eager", "fp32")
    assert tags["gate_passed"] == "1.0" and 0.0 <= float(tags["hr10"]) <= 1.0
    assert float(tags["latency_p99_ms_b1"]) > 0 and float(tags["users_per_s_b8"]) > 0
    for key in ("device_name", "cuda", "tensorrt_version", "onnxruntime_version", "fingerprint", "digest"):
        assert tags[key], key
    mlflow.set_tracking_uri(client.tracking_uri)
    package = read_package(mlflow.artifacts.download_artifacts(artifact_uri="models:/genrec@champion",
                                                               dst_path=str(tmp / "dl")))
    assert package.variant.name == "eager-fp32" and package.max_len == 16 and package.top_k == 20
    assert len(package.examples) == 16 and package.vocabulary.num_items == 80
    # validate logged each variant's gate and the comparison across runs to the parent run
    parent = client.get_run(version.run_id).data.tags["mlflow.parentRunId"]
    assert {"validate_history.md", "quality_vs_latency.png", "validate_variants.csv"} <= {
        a.path for a in client.list_artifacts(parent)}
    variant_runs = client.search_runs([client.get_experiment_by_name("genrec").experiment_id],
                                      filter_string="tags.variant = 'eager-fp32' and tags.stage = 'validate'")
    assert variant_runs[0].data.metrics["gate_passed"] == 1.0
    assert variant_runs[0].data.tags["gate_reason"] == "passed"


@pytest.mark.slow
def test_promoting_the_same_variant_again_registers_nothing(promoted):
    tmp, args, client = promoted
    result = run_pipeline([*args, "stage=promote"], cwd=tmp)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "already the champion (version 1)" in result.stdout + result.stderr
    assert [str(v.version) for v in client.search_model_versions("name = 'genrec'")] == ["1"]


@pytest.mark.slow
def test_nothing_passing_the_gates_is_refused(promoted):
    tmp, args, client = promoted
    result = run_pipeline([*args, "stage=[validate,promote]", "gates.fp32.min_topk_overlap=1.01"], cwd=tmp)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "no variant passed its gates" in output and "top-K overlap 1.0000 < 1.01 (gates.fp32.min_topk_overlap)" in output
    champion = client.get_model_version_by_alias("genrec", "champion")
    assert str(champion.version) == "1"
    summary = json.loads((tmp / "artifacts" / "runs" / champion.tags["source_run"] / "champion.json").read_text())
    assert summary["version"] == "1" and summary["previous"] is None


@pytest.mark.slow
def test_files_registered_before_are_not_registered_again_the_aliases_move_to_them(tmp_path, store_template):
    """eager-fp32 (version 1), then eager-fp16 (version 2), then eager-fp32 again: its digest matches version 1,
    so nothing is registered and champion/previous move to versions 1/2. Promote applies the gates as
    configured now to validate's metrics, which is how each run picks its variant here."""
    artifacts = seed_store(store_template, tmp_path / "artifacts").parent
    args = [*TINY, f"artifacts_dir={artifacts}", "precision=fp16", "gates.fp16.max_hr10_drop=1"]
    only_fp32, only_fp16 = "gates.fp16.min_topk_overlap=1.01", "gates.fp32.min_topk_overlap=1.01"
    first = run_pipeline([*args, "stage=[train,validate,promote]", only_fp32], cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    (run_dir,) = (artifacts / "runs").iterdir()
    client = MlflowClient(f"sqlite:///{artifacts / 'mlflow.db'}")

    def aliases() -> dict[str, str]:
        return {alias: str(client.get_model_version_by_alias("genrec", alias).version)
                for alias in ("champion", "previous") if alias in client.get_registered_model("genrec").aliases}

    assert aliases() == {"champion": "1"}
    second = run_pipeline([*args, "stage=promote", f"from_run={run_dir.name}", "gates.fp16.min_topk_overlap=0",
                           only_fp16], cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert aliases() == {"champion": "2", "previous": "1"}
    assert client.get_model_version("genrec", "2").tags["variant"] == "eager-fp16"

    third = run_pipeline([*args, "stage=promote", f"from_run={run_dir.name}", only_fp32], cwd=tmp_path)
    output = third.stdout + third.stderr
    assert third.returncode == 0, output
    digest = client.get_model_version("genrec", "1").tags["digest"]
    assert f"eager-fp32 is already registered as version 1 (same digest {digest}); nothing registered, " \
           "champion -> version 1; version 2 is now previous" in output
    assert sorted(str(v.version) for v in client.search_model_versions("name = 'genrec'")) == ["1", "2"]
    assert aliases() == {"champion": "1", "previous": "2"}
