"""Putting a release live on the local server without ever stopping what serves.

A release is its own models (repository.release_models: `<name>_vN_{preprocess,engine,postprocess}`, or the
engine alone with serving.fused, and the ensemble `<name>_vN`), and the public ensemble `<name>` that clients
call points at one release's steps. A deploy loads the new release beside the serving one and smoke-tests
`<name>_vN`; only then is `<name>` switched to it (Triton swaps the ensemble once the new one is loaded) and
the old release unloaded. On any failure before the switch the new release's models are unloaded and removed
while the old release serves on, untouched. If the server dies during a deploy, it is started again on the last
good release.

<serving.root>/deployed.json records the last good release: registry version, release and package
folders, and the version that served before it.
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.core import PipelineError
from pipeline.serving.repository import release_models
from pipeline.serving.server import LocalServer

log = logging.getLogger(__name__)

DEPLOYED_FILE = "deployed.json"


class RolledBack(PipelineError):
    """The new release failed to load or to answer correctly; what served before serves on."""


def deployed(root: Path) -> dict[str, Any] | None:
    path = Path(root) / DEPLOYED_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def record(root: Path, entry: dict[str, Any]) -> None:
    path = Path(root) / DEPLOYED_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry, indent=2))
    tmp.replace(path)  # never half written: a restart reads it


def rollout(server: LocalServer, ensemble: str, release: Path, version: str, smoke: Callable[[str], None],
            timeout_s: float, label: str = "the new release") -> float:
    """Loads `release` beside the serving one, runs smoke(model) on its own ensemble, switches `ensemble` to
    it and smoke-tests that too; -> seconds the new models took to load. Raises RolledBack with the cause
    when anything fails, after putting back what served."""
    good = deployed(server.root)
    new = [m for m in release_models(ensemble, version).values() if (Path(release) / m).is_dir()]  # fused: fewer
    old = [m for m in _models_in(Path(good["release"])) if m != ensemble] if good else []
    started = time.perf_counter()
    try:
        _copy_models(release, server.repository, new)
        _load(server, new[-1:], timeout_s)
        seconds = time.perf_counter() - started
        log.info("loaded %s beside what serves in %.1f s", ", ".join(new), seconds)
        smoke(new[-1])
    except Exception as err:
        raise RolledBack(f"{label} failed and was rolled back: {_cause(err)}; "
                         f"{_back_out(server, ensemble, [m for m in new if m not in old], good, timeout_s, False)}") from err
    try:
        _copy_models(release, server.repository, [ensemble])
        _load(server, [ensemble], timeout_s)
        smoke(ensemble)
    except Exception as err:
        raise RolledBack(f"{label} answered on its own but failed once switched to '{ensemble}': {_cause(err)}; "
                         f"{_back_out(server, ensemble, [m for m in new if m not in old], good, timeout_s, True)}") from err
    retired = [m for m in old if m not in new]
    _unload(server, retired[::-1], timeout_s)
    _remove(server.repository, retired)
    return seconds


def start_on_last_good(server: LocalServer) -> int:
    """Starts the server with the live repository holding the last good release and nothing else (a deploy
    that died half way may have left another release's models or a switched ensemble there)."""
    good = deployed(server.root)
    release = Path(good["release"]) if good else None
    keep = _models_in(release) if release is not None and release.is_dir() else []
    if server.repository.is_dir():
        _remove(server.repository, [p.name for p in server.repository.iterdir() if p.name not in keep])
    if keep:
        _copy_models(release, server.repository, keep)
    return server.start()


def _back_out(server: LocalServer, ensemble: str, added: list[str], good: dict | None, timeout_s: float,
              switched: bool) -> str:
    """Puts back what served before the deploy (`switched`: the public ensemble too); -> what serves now."""
    before = f"version {good['version']}" if good else None
    try:
        if server.pid() is not None and server.is_live():
            if switched and good:
                _copy_models(Path(good["release"]), server.repository, [ensemble])
                _load(server, [ensemble], timeout_s)
            elif switched:
                added = [*added, ensemble]
            _unload(server, added[::-1], timeout_s)
            _remove(server.repository, added)
            return f"{before} serves on" if before else "nothing was deployed before, so nothing serves"
        log.warning("the server died during the deploy; starting it again on the last good release")
        pid = start_on_last_good(server)
        if good:
            _wait_ready(server, ensemble, timeout_s)
        return (f"the server died during the deploy and was started again (pid {pid}) "
                + (f"on {before}" if before else "with nothing deployed"))
    except Exception as err:  # the server's client raises several types; all mean the same here
        return (f"putting back what served failed too ({_cause(err)}); see {server.log_file}, then "
                f"`make serve` (it starts on the last good release) or `make deploy` a version that works")


def _cause(err: Exception) -> str:
    cause = err.message() if hasattr(err, "message") and callable(err.message) else str(err)
    return (cause or type(err).__name__).split("\n\nAt:")[0]  # the python backend appends the model's traceback


def _client(server: LocalServer, timeout_s: float):
    import tritonclient.http as tc

    return tc.InferenceServerClient(server.url, connection_timeout=timeout_s, network_timeout=timeout_s)


def _load(server: LocalServer, names: list[str], timeout_s: float) -> None:
    """Loads each model in turn. An ensemble loads its steps itself, all at once (steps loaded one by one
    beforehand would be loaded a second time); a step that fails fails its ensemble's load. The server is
    watched meanwhile: when it dies, a stub it leaves behind holds its sockets and the call would wait out
    its whole timeout."""
    for name in names:
        done, failure = threading.Event(), []

        def load(model: str = name) -> None:
            client = _client(server, timeout_s)
            try:
                client.load_model(model)
            except Exception as err:  # re-raised below, in the deploy's thread
                failure.append(err)
            finally:
                client.close()
                done.set()

        threading.Thread(target=load, daemon=True).start()
        while not done.wait(0.5):
            if server.pid() is None:
                raise PipelineError(f"the server died while loading {name}:\n{server.log_tail(10)}")
        if failure:
            raise failure[0]


def _unload(server: LocalServer, names: list[str], timeout_s: float) -> None:
    """Unloads what it can; a model that is not loaded, or a server that is gone, is not an error here."""
    if not names:
        return
    client = _client(server, timeout_s)
    try:
        for name in names:
            try:
                client.unload_model(name)
            except Exception as err:  # the client raises several types; a model left loaded only wastes memory
                log.warning("could not unload %s: %s", name, _cause(err))
    finally:
        client.close()


def _wait_ready(server: LocalServer, model: str, timeout_s: float) -> None:
    client = _client(server, timeout_s)
    deadline = time.monotonic() + timeout_s
    try:
        while not client.is_model_ready(model):
            if time.monotonic() > deadline:
                raise PipelineError(f"{model} not ready {timeout_s:.0f} s after the restart:\n{server.log_tail()}")
            time.sleep(0.2)
    finally:
        client.close()


def _models_in(release: Path) -> list[str]:
    return sorted(p.name for p in release.iterdir() if (p / "config.pbtxt").is_file()) if release.is_dir() else []


def _copy_models(release: Path, live: Path, names: list[str]) -> None:
    # Plain copies (new modification times): the server sees every file as changed and reloads it.
    live.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not (release / name).is_dir():
            raise PipelineError(f"{release} holds no model {name}")
        shutil.rmtree(live / name, ignore_errors=True)
        shutil.copytree(release / name, live / name, copy_function=shutil.copy)


def _remove(live: Path, names: list[str]) -> None:
    for name in names:
        shutil.rmtree(live / name, ignore_errors=True)
