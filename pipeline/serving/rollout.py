"""Putting a release live on the local server: its models replace the live repository's, the server loads
them, a smoke test runs; on any failure the release that served before is put back and loaded again
(or, on a first deploy, the models are unloaded), so a bad release never keeps serving.

<serving.root>/deployed.json records what serves now: registry version, release and package folders.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from pipeline.core import PipelineError
from pipeline.serving.repository import step_names
from pipeline.serving.server import LocalServer

log = logging.getLogger(__name__)

DEPLOYED_FILE = "deployed.json"


class RolledBack(PipelineError):
    """The new release failed to load or to answer correctly; what served before serves again."""


def deployed(root: Path) -> dict[str, Any] | None:
    path = Path(root) / DEPLOYED_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def record(root: Path, entry: dict[str, Any]) -> None:
    (Path(root) / DEPLOYED_FILE).write_text(json.dumps(entry, indent=2))


def rollout(server: LocalServer, ensemble: str, release: Path, smoke: Callable[[], None], timeout_s: float,
            label: str = "the new release") -> None:
    """Makes `release` live and runs `smoke`; raises RolledBack (with the cause) after restoring the previous."""
    names = [ensemble, *step_names(ensemble).values()]
    previous = deployed(server.root)
    try:
        _make_live(release, server.repository, names)
        start = time.perf_counter()
        _load(server, names, timeout_s)
        log.info("loaded %s from %s in %.1f s", ensemble, release, time.perf_counter() - start)
        smoke()
    except Exception as err:
        cause = err.message() if hasattr(err, "message") and callable(err.message) else str(err)
        cause = cause.split("\n\nAt:")[0]  # the python backend appends the model's traceback
        restored = _restore(server, names, previous, timeout_s)
        raise RolledBack(f"{label} failed and was rolled back: {cause}; {restored}") from err


def _restore(server: LocalServer, names: list[str], previous: dict | None, timeout_s: float) -> str:
    try:
        if previous is not None and Path(previous["release"]).is_dir():
            _make_live(Path(previous["release"]), server.repository, names)
            _load(server, names, timeout_s)
            return f"version {previous['version']} serves again"
        client = _client(server, timeout_s)
        client.unload_model(names[0], unload_dependents=True)
        client.close()
        for name in names:
            shutil.rmtree(server.repository / name, ignore_errors=True)
        return "nothing was deployed before, so nothing serves now"
    except Exception as err:  # the server's client raises several types; all mean the same here
        return (f"restoring failed too ({err}); see {server.log_file}, then `make deploy` a version that works "
                "(deploy.alias=previous for the one before)")


def _client(server: LocalServer, timeout_s: float):
    import tritonclient.http as tc

    return tc.InferenceServerClient(server.url, connection_timeout=timeout_s, network_timeout=timeout_s)


def _load(server: LocalServer, names: list[str], timeout_s: float) -> None:
    """Loads the steps (in parallel), then the ensemble. Step by step because a step that fails to load is
    an error here even while an older copy of it keeps serving, which loading the ensemble alone hides."""
    def load(name: str) -> None:
        client = _client(server, timeout_s)
        try:
            client.load_model(name)
        finally:
            client.close()

    with ThreadPoolExecutor(len(names) - 1) as pool:
        list(pool.map(load, names[1:]))
    load(names[0])


def _make_live(release: Path, live: Path, names: list[str]) -> None:
    # Plain copies (new modification times): the server sees every file as changed and reloads it.
    for name in names:
        shutil.rmtree(live / name, ignore_errors=True)
        shutil.copytree(release / name, live / name, copy_function=shutil.copy)
