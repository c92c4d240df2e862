"""deploy against a real tritonserver that this module starts on free loopback ports and stops by its pid:
train -> onnx -> validate -> promote -> deploy on a tiny config; the server answers as the pipeline does;
bad requests get clear errors while the server keeps serving; a release that fails to load (its engine
raising or its stub killed) or to answer correctly never replaces the serving one; a server killed during
a deploy comes back on the last good release; the aliases follow what serves; a returning user (USER_ID)
is answered from its cached encoder state as the pipeline answers its whole history."""
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import ROOT, TINY, run_pipeline, seed_store
from pipeline.core import Manifest
from pipeline.data import load_splits
from pipeline.serving.client import GenrecClient, RequestRejected
from pipeline.serving.config import load_config
from pipeline.serving.loadtest import (CACHE_METRICS_SETTLE_S, ReturningUsers, cache_side, run_load,
                                       run_load_processes, scrape, scrape_cache, server_side)
from pipeline.serving.package import read_package
from pipeline.serving.repository import compile_python, write_repository
from pipeline.serving.rollout import RolledBack, deployed, rollout
from pipeline.serving.server import LocalServer
from pipeline.variants import load_variant

pytestmark = [pytest.mark.slow, pytest.mark.triton]


def _require_triton() -> None:
    if (ROOT / "artifacts" / "triton" / "pytriton" / "tritonserver" / "bin" / "tritonserver").is_file():
        return
    message = "no tritonserver under artifacts/triton: run `make triton`"
    if os.environ.get("GENREC_REQUIRE_TRITON"):
        pytest.fail(message + " (CI runs it before the tests)")
    pytest.skip(message)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def no_locale():
    """Everything of this module, the server included, runs with no locale set, as in a bare shell."""
    saved = {k: os.environ.pop(k) for k in ("LANG", "LC_ALL", "LC_CTYPE") if k in os.environ}
    yield
    os.environ.update(saved)


@pytest.fixture(scope="module")
def env(tmp_path_factory, no_locale, store_template):
    _require_triton()
    tmp = tmp_path_factory.mktemp("deploy")
    seed_store(store_template, tmp / "artifacts")
    http, grpc, metrics = _free_ports(3)
    args = [*TINY, f"artifacts_dir={tmp / 'artifacts'}", "precision=fp32", f"serving.http_port={http}",
            f"serving.grpc_port={grpc}", f"serving.metrics_port={metrics}", "serving.exit_timeout_s=3"]
    cfg = load_config(args)
    server = LocalServer(cfg.serving)
    pid = server.start()
    client = GenrecClient(server.url)
    try:
        yield tmp, args, cfg, server, client, MlflowClient(f"sqlite:///{tmp / 'artifacts' / 'mlflow.db'}")
    finally:
        client.close()
        server.stop()
        assert not Path(f"/proc/{pid}").exists() or b"tritonserver" not in Path(f"/proc/{pid}/cmdline").read_bytes()


def _pipeline(env, *extra):
    tmp, args = env[0], env[1]
    result = run_pipeline([*args, *extra], cwd=tmp)
    return result.returncode, result.stdout + result.stderr


def _promoted_variant(env, version: str):
    """The variant that registry `version` promoted, loaded on the CPU by the pipeline's own loader."""
    tmp, cfg, registry = env[0], env[2], env[5]
    tags = registry.get_model_version("genrec", version).tags
    manifest = Manifest.load(tmp / "artifacts" / "runs" / tags["source_run"] / "manifest.json")
    variant = next(v for v in manifest.variants() if v.name == tags["variant"])
    return load_variant(variant, torch.device("cpu"), cfg.validate.top_k)


def _pipeline_answers(env, version: str, users: int, k: int):
    """The pipeline's own top-k for the first test users, from the variant of the run that promoted `version`."""
    predict = _promoted_variant(env, version)
    test = load_splits(env[2]).test
    with torch.inference_mode():
        ids, scores = predict(test.history[:users], test.lengths[:users], None)
    histories = [test.history[u, : test.lengths[u]].tolist() for u in range(users)]  # synthetic: raw ids = model ids
    return histories, ids[:, :k].numpy(), scores[:, :k].numpy()


def test_deploy_serves_what_the_pipeline_answers(env):
    code, output = _pipeline(env, "stage=[train,onnx,validate,promote,deploy]", "promote.backends=[onnxruntime]")
    assert code == 0, output
    _, _, _, server, client, registry = env
    assert deployed(server.root)["version"] == "1"
    assert registry.get_model_version("genrec", "1").tags["backend"] == "onnxruntime"
    histories, ids, scores = _pipeline_answers(env, "1", users=12, k=10)
    for history, want_ids, want_scores in zip(histories, ids, scores):
        answer = client.recommend(history, 10)
        assert answer.model_version == "1"
        assert answer.item_ids.tolist() == want_ids.tolist()
        np.testing.assert_allclose(answer.scores, want_scores, atol=1e-5)
    tags = registry.get_model_version("genrec", "1").tags
    assert tags["deploy_status"] == "serving" and tags["deployed_url"] == f"http://{server.url}"
    assert tags["deployed_repository"] == str(server.repository) and tags["deployed_at"]


def test_query_command_matches_the_pipeline(env):
    tmp, args = env[0], env[1]
    out = subprocess.run([sys.executable, "-m", "pipeline.client", "--check", "--example", "3", *args],
                         cwd=tmp, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "MATCH" in out.stdout and '"model_version": "1"' in out.stdout


BAD = {
    "empty history": (np.zeros((1, 0), np.int64), [[5]], "empty history"),
    "negative id": (np.array([[3, -4, 5]]), [[5]], "negative item ids: -4"),
    "unknown id": (np.array([[3, 4000, 5]]), [[5]], "unknown item ids (1): 4000"),
    "too long": (np.arange(1, 18).reshape(1, -1), [[5]], "longer than the maximum 16"),
    "wrong dtype": (np.array([[3, 4, 5]], np.int32), [[5]], "data-type is 'INT32', but model 'genrec' expects 'INT64'"),
    "wrong shape": (np.array([[[3, 4, 5]]]), [[5]], "unexpected shape for input 'HISTORY'"),
    "k zero": (np.array([[3, 4, 5]]), [[0]], "k=0 is out of range; valid: 1..20"),
    "k too large": (np.array([[3, 4, 5]]), [[21]], "k=21 is out of range; valid: 1..20"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_a_clear_error_and_the_server_keeps_serving(env, case):
    client = env[4]
    history, k, message = BAD[case]
    with pytest.raises(RequestRejected, match=message.replace("(", r"\(").replace(")", r"\)")):
        client.infer(history, np.array(k, dtype=np.int64))
    assert client.recommend([3, 4, 5], 5).item_ids.shape == (5,)


def test_load_test_counts_what_the_server_counts(env):
    server = env[3]
    before = scrape(server.metrics_url)
    result = run_load(server.url, "genrec", [[1, 2, 3], [4, 5]], k=10, requests=40, concurrency=4)
    assert result["ok"] == 40 and result["errors"] == 0 and result["p99_ms"] > 0
    # The server counts a request when it completes, which can trail the response the client already has.
    deadline = time.monotonic() + 10
    counted = server_side(before, scrape(server.metrics_url))
    while counted["genrec"]["requests"] < 40 and time.monotonic() < deadline:
        time.sleep(0.2)
        counted = server_side(before, scrape(server.metrics_url))
    assert counted["genrec"]["requests"] == 40 and counted["genrec_v1_engine"]["batches"] >= 1


def test_a_load_split_over_client_processes_counts_every_request(env):
    """Two client processes (one Python process's threads share one interpreter lock, which capped the client
    before the server): every request is answered and counted once, by the client and by the server."""
    server = env[3]
    before = scrape(server.metrics_url)
    result = run_load_processes(2, server.url, "genrec", [[1, 2, 3], [4, 5]], k=10, requests=30, concurrency=4)
    assert (result["ok"], result["errors"], result["processes"]) == (30, 0, 2)
    assert len(result["latencies_ms"]) == 30 and result["p50_ms"] > 0
    deadline = time.monotonic() + 10
    counted = server_side(before, scrape(server.metrics_url))
    while counted["genrec"]["requests"] < 30 and time.monotonic() < deadline:
        time.sleep(0.2)
        counted = server_side(before, scrape(server.metrics_url))
    assert counted["genrec"]["requests"] == 30


def _broken_release(env, tmp_path, version: int, sabotage: str) -> Path:
    """A release of the serving package as another registry version whose engine runs `sabotage` at load."""
    cfg, server = env[2], env[3]
    release = tmp_path / f"v{version}"
    write_repository(read_package(Path(deployed(server.root)["package"])), cfg.serving, release, version, "local")
    model = release / f"genrec_v{version}_engine" / str(version) / "model.py"
    text = model.read_text()
    model.write_text(text.replace("    def initialize(self, args):\n",
                                  f"    def initialize(self, args):\n        {sabotage}\n", 1))
    assert sabotage in model.read_text()
    compile_python(model.parent)
    return release


def _serves_version_1(env) -> None:
    server = env[3]
    client = GenrecClient(server.url, timeout_s=30)  # a new connection: the server may have been restarted
    try:
        answer = client.recommend([3, 4, 5], 5)
    finally:
        client.close()
    assert answer.model_version == "1" and answer.item_ids.shape == (5,)
    assert sorted(p.name for p in server.repository.iterdir()) == ["genrec", "genrec_v1", "genrec_v1_engine"]


@pytest.mark.parametrize("sabotage, message", [
    ("raise RuntimeError('engine broken on purpose')", "engine broken on purpose"),
    # The stub process of the new engine dies while it loads, as a crash in native code kills it.
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "version 9 failed and was rolled back"),
])
def test_engine_that_fails_to_load_leaves_the_serving_version_answering(env, tmp_path, sabotage, message):
    server = env[3]
    pid = server.pid()
    release = _broken_release(env, tmp_path, 9, sabotage)
    with pytest.raises(RolledBack, match=message) as failed:
        rollout(server, "genrec", release, "9", smoke=lambda model: None, timeout_s=120, label="version 9")
    assert "version 1 serves on" in str(failed.value)
    assert server.pid() == pid  # the same server: version 1 was never unloaded
    _serves_version_1(env)


def test_failed_smoke_test_of_the_new_release_never_reaches_clients(env, tmp_path):
    _, _, cfg, server, client, _ = env
    release = tmp_path / "v8"
    write_repository(read_package(Path(deployed(server.root)["package"])), cfg.serving, release, 8, "local")
    tried = []

    def smoke(model: str) -> None:
        tried.append(model)
        assert client.recommend([3, 4, 5], 5).model_version == "1"  # clients still get version 1
        raise AssertionError("answers differ on purpose")

    with pytest.raises(RolledBack, match="answers differ on purpose; version 1 serves on"):
        rollout(server, "genrec", release, "8", smoke=smoke, timeout_s=120, label="version 8")
    assert tried == ["genrec_v8"]
    _serves_version_1(env)


def test_server_that_dies_during_a_deploy_comes_back_on_the_last_good_release(env, tmp_path):
    server = env[3]
    pid = server.pid()
    # The new engine kills the server (its stub's parent) while it loads.
    release = _broken_release(env, tmp_path, 7, "import os, signal; os.kill(os.getppid(), signal.SIGKILL)")
    with pytest.raises(RolledBack, match=r"the server died during the deploy and was started again \(pid \d+\) "
                                         r"on version 1"):
        rollout(server, "genrec", release, "7", smoke=lambda model: None, timeout_s=120, label="version 7")
    assert server.pid() not in (None, pid)
    # The stub that killed its server was busy loading and outlived it; the restart stopped it.
    assert not server.leftover_stubs()
    _serves_version_1(env)


def test_failed_smoke_test_rolls_back_then_second_deploy_moves_champion(env):
    _, _, _, server, client, registry = env

    def alias(name: str) -> str | None:
        aliases = registry.get_registered_model("genrec").aliases
        return str(aliases[name]) if name in aliases else None

    # A second model (eager this time: the torch engine), promoted; its deploy asks the server for more items
    # than it serves, so the smoke test fails and version 1 keeps serving.
    code, output = _pipeline(env, "stage=[train,validate,promote,deploy]", "seed=1", "deploy.smoke.k=21")
    assert code != 0 and "version 2 failed and was rolled back" in output and "version 1 serves on" in output
    assert client.recommend([3, 4, 5], 5).model_version == "1"
    assert registry.get_model_version("genrec", "2").tags["deploy_status"] == "rolled_back"
    # The registry says what serves: champion back on version 1, the failed one under its own alias.
    assert (alias("champion"), alias("failed"), alias("previous")) == ("1", "2", None)

    code, output = _pipeline(env, "stage=deploy", "deploy.alias=failed")  # retried, once the cause is fixed
    assert code == 0, output
    assert client.recommend([3, 4, 5], 5).model_version == "2"
    assert registry.get_model_version("genrec", "2").tags["backend"] == "eager"
    histories, ids, _ = _pipeline_answers(env, "2", users=4, k=10)
    assert [client.recommend(h, 10).item_ids.tolist() for h in histories] == ids.tolist()
    assert registry.get_model_version("genrec", "1").tags["deploy_status"] == "replaced"
    assert (alias("champion"), alias("previous")) == ("2", "1")
    assert sorted(p.name for p in server.repository.iterdir()) == ["genrec", "genrec_v2", "genrec_v2_engine"]

    code, output = _pipeline(env, "stage=deploy", "deploy.alias=previous")
    assert code == 0, output
    assert client.recommend([3, 4, 5], 5).model_version == "1"
    assert (alias("champion"), alias("previous")) == ("1", "2")


def _settled_cache_metrics(server) -> dict:
    """genrec_cache_* once the engine has sent what it counted (loadtest.CACHE_METRICS_SETTLE_S)."""
    time.sleep(CACHE_METRICS_SETTLE_S)
    return scrape_cache(server.metrics_url)


def _cache_counts(server, engine: str, before: dict, want: dict) -> dict:
    """The engine's genrec_cache_* counters since `before`, once they reach `want` (or after 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        counted = cache_side(before, scrape_cache(server.metrics_url)).get(engine, {})
        got = {key: counted.get(key, counted.get("paths", {}).get(key, {}).get("rows")) for key in want}
        if got == want or time.monotonic() > deadline:
            return got


def test_returning_user_is_answered_from_its_cached_state(env):
    tmp, args, cfg, server, client, registry = env
    code, output = _pipeline(env, "stage=deploy", "deploy.alias=previous")  # version 2: the eager HSTU
    assert code == 0, output
    version = deployed(server.root)["version"]
    assert registry.get_model_version("genrec", version).tags["backend"] == "eager"
    engine = f"genrec_v{version}_engine"
    assert f"genrec_v{version}_engine: eager-fp32 loaded" in (server.root / "server.log").read_text()
    assert "); user-state cache of 4.0 GiB on the device" in (server.root / "server.log").read_text()
    test = load_splits(cfg).test
    user = next(u for u in range(len(test.lengths)) if 3 <= test.lengths[u] < test.history.shape[1])
    longer = test.history[user, : test.lengths[user]].tolist()  # synthetic: raw ids = model ids
    history = longer[:-1]
    padded = torch.zeros(2, test.history.shape[1], dtype=torch.int64)
    padded[0, : len(history)], padded[1, : len(longer)] = torch.tensor(history), torch.tensor(longer)
    with torch.inference_mode():
        want_ids, want_scores = _promoted_variant(env, version)(padded, torch.tensor([len(history), len(longer)]), None)

    before = _settled_cache_metrics(server)
    first = client.recommend(history, 10, user_id=1234)
    second = client.recommend(longer, 10, user_id=1234)  # one new action: only it is encoded
    for answer, ids, scores in ((first, want_ids[0], want_scores[0]), (second, want_ids[1], want_scores[1])):
        assert answer.model_version == version
        assert answer.item_ids.tolist() == ids[:10].tolist()
        np.testing.assert_allclose(answer.scores, scores[:10].numpy(), atol=1e-5)
    assert _cache_counts(server, engine, before, {"misses": 1, "hits_device": 1, "hits_host": 0, "miss": 1,
                                                  "device_hit": 1}) == {"misses": 1, "hits_device": 1, "hits_host": 0,
                                                                        "miss": 1, "device_hit": 1}
    # Without USER_ID: the variant's own call, as before; the cache is not touched.
    plain = client.recommend(longer, 10)
    assert plain.item_ids.tolist() == want_ids[1, :10].tolist()
    assert _cache_counts(server, engine, before, {"misses": 1, "hits_device": 1, "no_user": 1}) == {
        "misses": 1, "hits_device": 1, "no_user": 1}
    # A bad USER_ID is refused with what was wrong; the server keeps serving.
    rows, k = np.array([[3, 4, 5]]), np.array([[5]])
    for user_id, message in ((np.array([[-3]]), "negative USER_ID: -3"),
                             (np.array([[7]], np.int32), "data-type is 'INT32', but model 'genrec' expects 'INT64'"),
                             (np.array([[7, 8]]), "unexpected shape for input 'USER_ID'")):
        with pytest.raises(RequestRejected, match=message):
            client.infer(rows, k, user_id)
    assert client.recommend([3, 4, 5], 5, user_id=1234).item_ids.shape == (5,)  # another history: a miss

    # The load test's returning users, beside requests without USER_ID: every request answered, and hits.
    items = read_package(Path(deployed(server.root)["package"])).vocabulary.raw[1:]
    visits = ReturningUsers(8, [longer], items, test.history.shape[1], seed=1)
    before, results = _settled_cache_metrics(server), {}
    loads = [threading.Thread(target=lambda: results.update(users=run_load(
                 server.url, "genrec", [], 10, 40, 4, visits=visits))),
             threading.Thread(target=lambda: results.update(plain=run_load(server.url, "genrec", [longer], 10, 20, 2)))]
    for load in loads:
        load.start()
    for load in loads:
        load.join()
    assert results["users"]["errors"] == results["plain"]["errors"] == 0, results
    counted = _cache_counts(server, engine, before, {"no_user": 20})
    assert counted == {"no_user": 20}
    cache = cache_side(before, _settled_cache_metrics(server))[engine]
    assert cache["hits_device"] > 0 and cache["misses"] >= 1
    assert cache["hits_device"] + cache["hits_host"] + cache["misses"] == 40


@pytest.fixture(scope="module")
def compiled_run(env):
    """The first run's checkpoint compiled once: the CPU's torch.compile entry and an AOTInductor package."""
    source = env[5].get_model_version("genrec", "1").tags["source_run"]
    code, output = _pipeline(env, "stage=[compile,validate]", f"from_run={source}", "compile.aoti.devices=[cpu]")
    assert code == 0, output
    return re.search(r"run ([0-9a-f]{32}): stages", output).group(1)


@pytest.mark.parametrize("backend", ["inductor", "aoti"])  # onnxruntime and eager: the tests above
def test_champion_of_each_backend_deploys_and_answers_as_the_pipeline(env, compiled_run, backend):
    tmp, args, _, server, _, registry = env
    # Batches run at a bucket of 4 rows: the 3-row request below is padded to 4 and cut back.
    code, output = _pipeline(env, "stage=[promote,deploy]", f"from_run={compiled_run}", f"promote.backends=[{backend}]",
                             "serving.batch_buckets=[4]")
    assert code == 0, output
    version = deployed(server.root)["version"]
    assert registry.get_model_version("genrec", version).tags["backend"] == backend
    out = subprocess.run([sys.executable, "-m", "pipeline.client", "--check", "--example", "2", *args],
                         cwd=tmp, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "MATCH" in out.stdout, out.stdout + out.stderr
    assert f'"model_version": "{version}"' in out.stdout
    log = (server.root / "server.log").read_text()
    # The load split into its parts; the compiled variant's eager modules serve returning users, an AOTInductor
    # package has none to reach.
    cache = {"inductor": "user-state cache of 4.0 GiB on the device and 16.0 GiB on the host (",
             "aoti": "no user-state cache: aoti-fp32 runs an exported artifact"}[backend]
    # The first deploy's warm-up of a torch.compile variant loads what validate compiled: hits in Inductor's
    # and AOTAutograd's caches, no compile inside the server.
    warm = {"inductor": r" \(4: [0-9.]+ s; Inductor's graph cache [0-9]+ hit, AOTAutograd's [0-9]+ hit\)",
            "aoti": r" \(4: [0-9.]+ s\)"}[backend]
    assert re.search(r"\(load [0-9.]+ s, batch buckets \[4\] [0-9.]+ s" + warm + r", user-state cache [0-9.]+ s\); "
                     + re.escape(cache), log), log[-3000:]
    rows = np.array([[3, 4, 5, 6], [9, 8, 7, 6], [11, 2, 30, 4]])
    answer = env[4].infer(rows, np.full((3, 1), 10, dtype=np.int64))
    padded = torch.zeros(3, load_splits(env[2]).test.history.shape[1], dtype=torch.int64)
    padded[:, :4] = torch.from_numpy(rows)
    with torch.inference_mode():
        want_ids, want_scores = _promoted_variant(env, version)(padded, torch.full((3,), 4), None)
    assert np.asarray(answer.item_ids).tolist() == want_ids[:, :10].tolist()
    np.testing.assert_allclose(answer.scores, want_scores[:, :10].numpy(), atol=1e-4)


def test_fused_release_answers_as_the_pipeline_and_refuses_bad_requests_alone(env):
    """serving.fused=true: one python model per release; the same answers, errors, cache, and blue/green switch."""
    tmp, args, cfg, server, client, registry = env
    source = registry.get_model_version("genrec", "2").tags["source_run"]  # the eager HSTU: the torch engine
    code, output = _pipeline(env, "stage=[promote,deploy]", f"from_run={source}", "promote.backends=[eager]",
                             "serving.fused=true")
    assert code == 0, output  # the deploy's smoke test compared the server's answers with the pipeline's
    version = deployed(server.root)["version"]
    assert sorted(p.name for p in server.repository.iterdir()) == ["genrec", f"genrec_v{version}",
                                                                   f"genrec_v{version}_engine"]
    out = subprocess.run([sys.executable, "-m", "pipeline.client", "--check", "--example", "3", *args],
                         cwd=tmp, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "MATCH" in out.stdout, out.stdout + out.stderr
    for history, k, message in BAD.values():
        with pytest.raises(RequestRejected, match=message.replace("(", r"\(").replace(")", r"\)")):
            client.infer(history, np.array(k, dtype=np.int64))

    # Good and bad requests of different lengths at once: the batcher queues them together (ragged HISTORY);
    # each bad one gets its error, each good one the pipeline's answer.
    test = load_splits(cfg).test
    users = [u for u in range(len(test.lengths)) if test.lengths[u] >= 2][:12]
    histories = [test.history[u, : test.lengths[u]].tolist() for u in users]  # synthetic: raw ids = model ids
    with torch.inference_mode():
        want, _ = _promoted_variant(env, version)(test.history[users], test.lengths[users], None)
    results = {}

    def ask(i: int) -> None:
        one = GenrecClient(server.url)
        try:
            if i % 3 == 2:
                with pytest.raises(RequestRejected, match="unknown item ids"):
                    one.infer(np.array([[3, 4000 + i]]), np.array([[5]]))
                results[i] = "refused"
            else:
                results[i] = one.recommend(histories[i], 10, user_id=i if i % 2 else None).item_ids.tolist()
        finally:
            one.close()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(histories))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: "refused" if i % 3 == 2 else want[i, :10].tolist() for i in range(len(histories))}
    # A returning user's second request, one action longer, is answered from the cache as from its whole history.
    engine, before = f"genrec_v{version}_engine", _settled_cache_metrics(server)
    longer = histories[0][:-1]
    first = client.recommend(longer, 10, user_id=4321)
    second = client.recommend(histories[0], 10, user_id=4321)
    assert second.item_ids.tolist() == want[0, :10].tolist() and first.model_version == version
    assert _cache_counts(server, engine, before, {"misses": 1, "hits_device": 1}) == {"misses": 1, "hits_device": 1}


def test_the_serving_version_deployed_again_loads_beside_itself(env):
    """The fused release's version deployed again with serving.fused=false (another layout of the same
    registry version): a new release v<N>r2 loads beside the serving one while clients keep getting answers,
    then replaces it; a deploy of that version that fails leaves v<N>r2 answering."""
    tmp, args, cfg, server, client, registry = env
    version = deployed(server.root)["version"]
    assert sorted(p.name for p in server.repository.iterdir()) == ["genrec", f"genrec_v{version}",
                                                                   f"genrec_v{version}_engine"]  # fused, from above
    test = load_splits(cfg).test
    history = test.history[0, : test.lengths[0]].tolist()
    want = client.recommend(history, 10).item_ids.tolist()
    answers, stop = [], threading.Event()

    def ask() -> None:  # a client asking throughout the deploy: every answer must be the same
        one = GenrecClient(server.url)
        try:
            while not stop.is_set():
                answers.append(one.recommend(history, 10).item_ids.tolist())
        finally:
            one.close()

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        code, output = _pipeline(env, "stage=deploy", "serving.fused=false")
    finally:
        stop.set()
        asker.join()
    assert code == 0, output
    assert f"version {version} (release {version}r2, beside the one that served)" in output
    assert answers and all(a == want for a in answers)
    assert deployed(server.root)["release_id"] == f"{version}r2"
    assert sorted(p.name for p in server.repository.iterdir()) == [
        "genrec", f"genrec_v{version}r2", f"genrec_v{version}r2_engine", f"genrec_v{version}r2_postprocess",
        f"genrec_v{version}r2_preprocess"]
    assert client.recommend(history, 10).item_ids.tolist() == want

    code, output = _pipeline(env, "stage=deploy", "deploy.smoke.k=21")  # fails its smoke test
    assert code != 0 and f"version {version} failed and was rolled back" in output
    assert client.recommend(history, 10).item_ids.tolist() == want
    assert deployed(server.root)["release_id"] == f"{version}r2"
    assert sorted(p.name for p in server.repository.iterdir())[1] == f"genrec_v{version}r2"
