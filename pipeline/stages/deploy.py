"""deploy: the registry's champion -> a Triton model repository -> the local server, smoke-tested.

Resolves models:/<promote.model_name>@<deploy.alias>, refuses a TensorRT engine built for another GPU or
TensorRT version, writes the repository (ensemble: preprocess -> engine -> postprocess), and for the
local target loads it into the local server (started on the last good release when none answers) beside
what serves, compares its answers for packaged test histories with the pipeline's own, and only then
switches clients to it (serving/rollout.py). On any failure what served before serves on: the version is
tagged deploy_status=rolled_back and alias `failed`, and `champion` moves back to the version that serves.
`previous` is always the version that served before the serving one. The deployment is recorded on the
model version (time, server URL, repository).
"""
from __future__ import annotations

import logging
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from pipeline.core import Context, PipelineError, StageResult
from pipeline.serving.client import GenrecClient, mismatch
from pipeline.serving.package import read_package
from pipeline.serving.repository import engine_device, next_release, write_repository
from pipeline.serving.rollout import RolledBack, deployed, record, rollout, start_on_last_good
from pipeline.serving.server import LocalServer, cuda_available
from pipeline.tracking import CHAMPION, PREVIOUS, host_tags

log = logging.getLogger(__name__)

KEEP_RELEASES = 3  # the serving one, the one before it (to roll back to) and one more


def run(ctx: Context) -> StageResult:
    dcfg, scfg, name = ctx.cfg.deploy, ctx.cfg.serving, ctx.cfg.promote.model_name
    version = ctx.tracker.model_version(name, dcfg.alias)
    if version is None:
        raise PipelineError(f"models:/{name}@{dcfg.alias} does not exist in {ctx.tracker.uri}; "
                            "run stage=promote first (make run does)")
    number = str(version.version)  # an int or a str, depending on the MLflow store
    _check_fingerprint(version, dcfg, ctx)
    root = Path(scfg.root)
    # A new release is written beside the serving one and takes its name only once it serves; the version
    # that serves now, deployed again, becomes a new release of its own (repository.next_release).
    serving_now = deployed(root) if dcfg.target == "local" else None
    serving_now = serving_now if serving_now is not None and serving_now["model"] == name else None
    release_id = next_release(number, serving_now.get("release_id", serving_now["version"]) if serving_now else None)
    package_dir = root / "packages" / f"v{release_id}"
    package = read_package(ctx.tracker.download_model_version(name, number, _fresh(package_dir)))
    release = root / ("releases" if dcfg.target == "local" else dcfg.target) / f"v{release_id}"
    staging = release.with_name(f".staging-{release.name}") if dcfg.target == "local" else release
    folders = write_repository(package, scfg, staging, int(number), dcfg.target, cuda_here=cuda_available(),
                               release=release_id)
    for model, folder in folders.items():
        ctx.tracker.log_artifact(folder / "config.pbtxt", artifact_path=f"triton/{model}")
    log.info("models:/%s@%s is version %s (%s); repository written to %s", name, dcfg.alias, number,
             package.variant.name, staging)
    ctx.tracker.set_tags({"model_version": number, "variant": package.variant.name, "repository": str(release)})
    if dcfg.target != "local":
        ctx.tracker.set_model_version_tags(name, number, {"repository_written": str(release), "repository_target": dcfg.target})
        log.info("target %s: the repository is for a full Triton image (copy %s); nothing loaded here", dcfg.target, release)
        return StageResult(metrics={"deployed_version": 0})

    server = LocalServer(scfg)
    if not server.is_live():
        if not dcfg.start_server:
            raise PipelineError(f"no Triton server answers on {server.url}; start one with `make serve`")
        start_on_last_good(server)
    elif server.pid() is None:
        raise PipelineError(f"the server on {server.url} was not started from {server.root}, so it serves another "
                            "repository; stop it (make stop with its artifacts_dir) or set serving.*_port")
    smoke = _smoke_test(package, server, number, dcfg.smoke, engine_device(package, scfg.instance_group.kind),
                        returning=bool(scfg.cache.enabled))
    start = time.perf_counter()
    try:
        load_seconds = rollout(server, scfg.model_name, staging, release_id, smoke, dcfg.load_timeout_s,
                               label=f"version {number}")
    except RolledBack as err:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(package_dir, ignore_errors=True)  # never the serving release's: its name differs
        ctx.tracker.set_model_version_tags(name, number, {
            "deploy_status": "rolled_back", "deploy_failed_at": _now(), "deploy_error": str(err)[:4000]})
        _aliases_after_failure(ctx, name, number, deployed(root))
        raise
    seconds = time.perf_counter() - start
    shutil.rmtree(release, ignore_errors=True)
    staging.rename(release)
    before = deployed(root)
    before = before if before is not None and before["model"] == name else None
    served_before = before["version"] if before and before["version"] != number else (before or {}).get("previous")
    record(root, {"model": name, "version": number, "release_id": release_id, "variant": package.variant.name,
                  "release": str(release),
                  "package": str(package.root), "url": server.url, "grpc_url": server.grpc_url, "time": _now(),
                  "previous": served_before})
    ctx.tracker.set_model_version_tags(name, number, {
        "deploy_status": "serving", "deployed_at": _now(), "deployed_url": f"http://{server.url}",
        "deployed_grpc_url": server.grpc_url, "deployed_repository": str(server.repository),
        "deployed_release": str(release), "load_seconds": f"{load_seconds:.1f}"})
    if before is not None and before["version"] != number:
        ctx.tracker.set_model_version_tags(name, before["version"], {"deploy_status": "replaced"})
    # The registry follows what serves: champion is this version, previous the one that served before it.
    ctx.tracker.set_alias(name, CHAMPION, number)
    ctx.tracker.set_alias(name, PREVIOUS, served_before)
    _prune(root, keep={str(release), before["release"] if before else ""})
    log.info("version %s%s serves on http://%s (gRPC %s) and answers as the pipeline does (loaded in %.1f s)",
             number, f" (release {release_id}, beside the one that served)" if release_id != number else "",
             server.url, server.grpc_url, load_seconds)
    return StageResult(metrics={"deployed_version": int(number), "load_seconds": load_seconds,
                                "load_and_smoke_seconds": seconds})


def _aliases_after_failure(ctx: Context, name: str, number: str, serving: dict | None) -> None:
    """The failed version gets alias `failed`; champion and previous go back to what serves and what
    served before it (neither ever names a version that failed)."""
    serving = serving if serving is not None and serving["model"] == name else None
    ctx.tracker.set_alias(name, "failed", number)
    ctx.tracker.set_alias(name, CHAMPION, serving["version"] if serving else None)
    ctx.tracker.set_alias(name, PREVIOUS, serving.get("previous") if serving else None)
    log.warning("alias champion -> %s, failed -> version %s",
                f"version {serving['version']} (it serves)" if serving else "none (nothing serves)", number)


# The smoke test's returning users: ids no client is expected to send (a real user of the same id would only lose
# its cached state: a cached prefix that does not match a request's history is never used).
SMOKE_USER_ID = 2**62


def _smoke_test(package, server: LocalServer, version: str, smoke, device, returning: bool = False):
    """check(model): the model's answers for a few packaged test histories must be the pipeline's own,
    computed on the engine's device. The pipeline's answers come first: a package that does not load here
    never reaches the server.

    returning (the engine's user-state cache is on): each history is also sent as a returning user would send
    it, without its last action and then whole, under one USER_ID, so that the second answer comes from the
    cached state of the first (docs/INCREMENTAL.md), and both must be the pipeline's own answers too. fp32
    packages only: in 16 bits the incremental path's rounding differs from the variant's within the
    precision's gate, which the smoke test's tolerance is not."""
    predict = package.load(device)
    examples = [package.example(i) for i in range(min(smoke.examples, len(package.examples)))]
    if not examples:
        raise PipelineError("the package holds no test histories for the smoke test; promote it again")
    if package.time_bias and package.example_timestamps is None:
        raise PipelineError("this time-bias model's package holds no timestamps for its test histories; promote it "
                            "again with a dataset that has timestamps")
    expected = [package.recommend(predict, history, smoke.k, device, times) for history, times in examples]
    visits = []  # (user id, [(history, times, expected), ...] in the order a returning user sends them)
    if returning and package.variant.precision == "fp32":
        for i, ((history, times), answer) in enumerate(zip(examples, expected)):
            if len(history) >= 2:
                before, before_times = history[:-1], None if times is None else times[:-1]
                first = package.recommend(predict, before, smoke.k, device, before_times)
                visits.append((SMOKE_USER_ID + i, [(before, before_times, first), (history, times, answer)]))
    elif returning:
        log.info("smoke test: returning users not sent to a %s package (only fp32 answers are compared with the "
                 "pipeline's within deploy.smoke.atol)", package.variant.precision)

    def check(model: str) -> None:
        client = GenrecClient(server.url, model)
        try:
            requests = [(history, times, answer, None) for (history, times), answer in zip(examples, expected)]
            requests += [(history, times, answer, user) for user, sent in visits for history, times, answer in sent]
            for history, times, (ids, scores), user in requests:
                answer = client.recommend(history, smoke.k, user_id=user, timestamps=times)
                if answer.model_version != str(version):
                    raise PipelineError(f"smoke test of {model}: version {answer.model_version} answered, not {version}")
                problem = mismatch(answer, ids, scores, smoke.atol)
                if problem:
                    who = "" if user is None else f" (a returning user, USER_ID {user}, {len(history)} actions)"
                    raise PipelineError(f"smoke test of {model}: the server's answer{who} differs from the "
                                        f"pipeline's: {problem}")
        finally:
            client.close()

    return check


def _check_fingerprint(version, dcfg, ctx: Context) -> None:
    """A TensorRT engine runs only on the GPU model and TensorRT version it was built with."""
    if version.tags.get("backend") != "tensorrt":
        return
    here = host_tags(ctx.device)
    for key in ("device_name", "tensorrt_version"):
        target = dcfg.target_fingerprint[key] or here[key]
        if version.tags.get(key) != target:
            raise PipelineError(
                f"version {version.version} is a TensorRT engine built with {key}={version.tags.get(key)!r}, but the "
                f"target has {target!r}; rebuild it there (stage=trt) and promote it, or set deploy.target_fingerprint")


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _prune(root: Path, keep: set[str]) -> None:
    """Keeps the newest releases (and their packages), always those in `keep`."""
    def order(path: Path) -> tuple[int, int]:
        m = re.fullmatch(r"v(\d+)(?:r(\d+))?", path.name)
        return (int(m.group(1)), int(m.group(2) or 1)) if m else (-1, -1)

    releases = sorted((p for p in (root / "releases").glob("v*") if order(p)[0] >= 0), key=order, reverse=True)
    for old in releases[KEEP_RELEASES:]:
        if str(old) not in keep:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(root / "packages" / old.name, ignore_errors=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
