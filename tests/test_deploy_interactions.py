"""Logs end to end against a real tritonserver (started on free loopback ports, stopped by its pid):
data=interactions -> train -> validate -> promote -> deploy. Text ids from a Parquet file with renamed columns:
requests send the raw text ids and answers come back as raw text ids, equal to the pipeline's own answer. A
time-bias model from a CSV: requests carry TIMESTAMPS beside HISTORY and the server answers as the pipeline
does; a request without them gets a clear error."""
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, run_pipeline
from pipeline.serving.client import GenrecClient, RequestRejected
from pipeline.serving.config import load_config
from pipeline.serving.package import read_package
from pipeline.serving.rollout import deployed
from pipeline.serving.server import LocalServer
from test_deploy import _free_ports, _require_triton

pytestmark = [pytest.mark.slow, pytest.mark.triton]


def _args(tmp_path, *data) -> list[str]:
    """`data` overrides, a tiny fp32 model, and a server of its own on free loopback ports."""
    http, grpc, metrics = _free_ports(3)
    return ["data=interactions", *data, "model.max_len=8", "model.dim=16", "train.epochs=1", "train.batch_size=64",
            "train.num_negatives=8", "validate.batch_sizes=[1,8]", "validate.warmup=1", "validate.iters=3",
            "validate.top_k=20", "precision=fp32", f"artifacts_dir={tmp_path / 'artifacts'}",
            f"serving.http_port={http}", f"serving.grpc_port={grpc}", f"serving.metrics_port={metrics}",
            "serving.exit_timeout_s=3"]


def test_text_ids_are_served_as_raw_ids(tmp_path):
    _require_triton()
    rng = np.random.default_rng(1)
    users, items, times = [], [], []
    for user in range(50):
        for step, item in enumerate(rng.choice(140, size=9, replace=False)):
            users.append(f"user {user}")
            items.append(f"sku-{item:04d}")
            times.append(f"2024-03-{1 + step:02d}T12:00:00Z")  # ISO-8601 strings
    pq.write_table(pa.table({"customer": users, "product": items, "at": times}), tmp_path / "log.parquet",
                   row_group_size=100)
    args = _args(tmp_path, f"data.path={tmp_path / 'log.parquet'}", "data.columns.user=customer",
                 "data.columns.item=product", "data.columns.timestamp=at")
    server = LocalServer(load_config(args).serving)
    try:
        result = run_pipeline([*args, "stage=[train,validate,promote,deploy]"], cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        package = read_package(deployed(server.root)["package"])
        assert package.vocabulary.text and package.examples[0][0].startswith("sku-")
        client = GenrecClient(server.url)
        try:
            history = package.examples[1]
            answer = client.recommend(history, 5)
            want_ids, want_scores = package.recommend(package.load(), history, 5)
            assert answer.item_ids.tolist() == want_ids.tolist() and all(i.startswith("sku-") for i in want_ids)
            np.testing.assert_allclose(answer.scores, want_scores, atol=1e-5)
            with pytest.raises(RequestRejected, match=r"unknown item ids \(1\): sku-9999"):
                client.recommend([history[0], "sku-9999"], 5)
        finally:
            client.close()
        out = subprocess.run([sys.executable, "-m", "pipeline.client", "--check", *args], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "MATCH" in out.stdout, out.stdout + out.stderr
    finally:
        server.stop()


def test_time_bias_model_serves_with_timestamps(tmp_path):
    _require_triton()
    rng = np.random.default_rng(2)
    lines = ["user_id,item_id,timestamp"]
    for user in range(50):
        start = 1_700_000_000 + int(rng.integers(0, 10**6))
        gaps = np.cumsum(rng.integers(60, 10**5, size=9))
        lines += [f"{user},{item},{start + gap}" for item, gap in zip(rng.choice(140, size=9, replace=False), gaps)]
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    args = _args(tmp_path, "data.path=log.csv", "model.time_bias=true", "promote.backends=[eager]")
    server = LocalServer(load_config(args).serving)
    try:
        result = run_pipeline([*args, "stage=[train,validate,promote,deploy]"], cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        package = read_package(deployed(server.root)["package"])
        history, times = package.example(2)
        assert package.time_bias and len(times) == len(history)
        predict = package.load()
        client = GenrecClient(server.url)
        try:
            answer = client.recommend(history, 5, timestamps=times)
            want_ids, want_scores = package.recommend(predict, history, 5, timestamps=times)
            assert answer.item_ids.tolist() == want_ids.tolist()
            np.testing.assert_allclose(answer.scores, want_scores, atol=1e-5)
            # The times matter: the same history an hour apart per action is answered differently.
            spread = [times[0] + 3600 * i for i in range(len(times))]
            other_ids, other_scores = package.recommend(predict, history, 5, timestamps=spread)
            assert not np.allclose(other_scores, want_scores)
            np.testing.assert_allclose(client.recommend(history, 5, timestamps=spread).scores, other_scores, atol=1e-5)
            with pytest.raises(RequestRejected, match=r"send TIMESTAMPS \[batch, length\]"):
                client.recommend(history, 5)
        finally:
            client.close()
    finally:
        server.stop()
