"""The local Triton Inference Server: the real tritonserver binary (python backend only) from the
`nvidia-pytriton` wheel, unpacked under artifacts/ and never pip-installed (the wheel pins numpy<2).

    python -m pipeline.serving install     # make triton
    python -m pipeline.serving start       # make serve: 127.0.0.1, explicit model control, ports from config
    python -m pipeline.serving stop | status

The python backend's stub runs models in an embedded Python that must be this project's: the
interpreter's folder goes first on PATH (the stub finds the virtual environment's site-packages through
it), libpython's folder and the wheel's bundled libraries on LD_LIBRARY_PATH, and the project on
PYTHONPATH (which the stub's Python ignores: the engine that needs the project reads it itself).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from pipeline import PROJECT_ROOT
from pipeline.core import PipelineError

log = logging.getLogger(__name__)

STATE_FILE, LOG_FILE, REPOSITORY = "server.json", "server.log", "repository"
_SERVER_DIR = "pytriton/tritonserver"
_LIBS_DIR = "nvidia_pytriton.libs"


class ServerError(PipelineError):
    """The local server cannot be installed, started or reached; the message says how to fix it."""


@dataclass(frozen=True)
class TritonInstall:
    """The unpacked wheel: the binary, its backends and caches, its bundled libraries."""

    root: Path

    @property
    def binary(self) -> Path:
        return self.root / _SERVER_DIR / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.root / _SERVER_DIR / "backends"

    @property
    def caches(self) -> Path:
        return self.root / _SERVER_DIR / "caches"

    @property
    def libs(self) -> Path:
        return self.root / _LIBS_DIR

    @property
    def stub(self) -> Path:
        return self.backends / "python" / "triton_python_backend_stub"

    @classmethod
    def find(cls, triton_dir: str | Path) -> "TritonInstall":
        found = cls(Path(triton_dir))
        if not (found.binary.is_file() and found.stub.is_file()):
            raise ServerError(f"no tritonserver under {triton_dir}: run `make triton` (downloads the nvidia-pytriton "
                              "wheel and unpacks it there; nothing is installed into the environment)")
        return found


def install(triton_dir: str | Path, wheel: str, wheel_file: str | Path | None = None) -> TritonInstall:
    """pip download --no-deps <wheel> (or take the wheel already at wheel_file, on a host without a package
    index), unpack the server and its libraries, and put the python backend stub built for this Python where
    the backend looks for it."""
    triton_dir = Path(triton_dir)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    libpython = _libpython_dir()
    with tempfile.TemporaryDirectory() as tmp:
        if wheel_file is not None:
            archive = Path(wheel_file)
            if not (archive.is_file() and zipfile.is_zipfile(archive)):
                raise ServerError(f"{archive} is not a wheel: pass the nvidia-pytriton .whl file")
        else:
            log.info("downloading %s (about 55 MB)", wheel)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                            "-d", tmp, wheel], check=True)
            (archive,) = Path(tmp).glob("*.whl")
        triton_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=triton_dir.parent, prefix=".triton-"))
        try:
            _unpack(archive, staging, python)
        except BaseException:
            shutil.rmtree(staging)
            raise
        (staging / "INSTALLED.json").write_text(json.dumps({"wheel": archive.name, "python": python,
                                                            "libpython": str(libpython)}, indent=2))
    if triton_dir.exists():
        shutil.rmtree(triton_dir)
    staging.rename(triton_dir)
    log.info("tritonserver ready in %s (python backend stub for Python %s)", triton_dir, python)
    return TritonInstall(triton_dir)


def _unpack(archive: Path, dst: Path, python: str) -> None:
    """The server and its bundled libraries (executable bits kept), and the stub for `python` put where
    the python backend looks for it."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.filename.startswith((_SERVER_DIR + "/", _LIBS_DIR + "/")) and not info.is_dir():
                target = Path(zf.extract(info, dst))
                if (info.external_attr >> 16) & stat.S_IXUSR:
                    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    stubs = dst / _SERVER_DIR / "python_backend_stubs"
    available = sorted(p.name for p in stubs.iterdir())
    if python not in available:
        raise ServerError(f"{archive.name} has python backend stubs for Python {', '.join(available)}, not {python}; "
                          "create the environment with one of those")
    shutil.copy2(stubs / python / "triton_python_backend_stub", TritonInstall(dst).stub)


def _libpython_dir() -> Path:
    """The folder holding this Python's shared libpython, for the stub's LD_LIBRARY_PATH."""
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        # Debian-style layouts keep it in the multiarch folder below LIBDIR.
        for folder in (Path(libdir), Path(libdir) / (sysconfig.get_config_var("MULTIARCH") or "")):
            if (folder / soname).is_file():
                return folder
    raise ServerError(f"{sys.executable} has no shared libpython, which the python backend's stub links to; "
                      "create .venv from a Python built with --enable-shared (distribution packages and "
                      "pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared are)")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class LocalServer:
    """One tritonserver process on 127.0.0.1 serving <serving.root>/repository, explicit model control."""

    def __init__(self, scfg: DictConfig) -> None:
        self.cfg = scfg
        self.root = Path(scfg.root)
        self.repository = self.root / REPOSITORY
        self.state_file, self.log_file = self.root / STATE_FILE, self.root / LOG_FILE
        self.url = f"{scfg.host}:{scfg.http_port}"
        self.grpc_url = f"{scfg.host}:{scfg.grpc_port}"
        self.metrics_url = f"http://{scfg.host}:{scfg.metrics_port}/metrics"

    def is_live(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url}/v2/health/live", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def command(self, install: TritonInstall) -> list[str]:
        c = self.cfg
        return [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={install.backends}",
            f"--cache-directory={install.caches}",
            "--model-control-mode=explicit",
            f"--http-address={c.host}", f"--http-port={c.http_port}",
            f"--grpc-address={c.host}", f"--grpc-port={c.grpc_port}",
            f"--metrics-address={c.host}", f"--metrics-port={c.metrics_port}",
            "--allow-metrics=true", *self._cpu_only_flags(),
            "--strict-readiness=true",
            f"--exit-timeout-secs={c.exit_timeout_s}",
            "--log-verbose=0",
            # What was deployed serves again after a restart; a model that fails then is logged, not fatal.
            "--exit-on-error=false",
            *([f"--load-model={c.model_name}"] if (self.repository / c.model_name).is_dir() else []),
        ]

    def _cpu_only_flags(self) -> list[str]:
        # Without a GPU instance, no pinned host memory pool and no GPU metrics (both only warn on a CPU host).
        kind = self.cfg.instance_group.kind
        if kind == "KIND_GPU" or (kind == "auto" and cuda_available()):
            return []
        return ["--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0"]

    def environment(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(_libpython_dir()), str(install.libs), env.get("LD_LIBRARY_PATH", "")) if p)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("OMP_NUM_THREADS", str(self.cfg.threads))
        return env

    def start(self) -> int:
        """Starts the server in its own session (it outlives this process); -> its pid once it is live."""
        install = TritonInstall.find(self.cfg.triton_dir)
        if self.is_live():
            raise ServerError(f"something already answers on {self.url}; `make stop` it or choose serving.http_port")
        self.repository.mkdir(parents=True, exist_ok=True)
        for pid in self.leftover_stubs():
            log.warning("stopping python backend stub %d, left running by a server of %s that died", pid, self.root)
            os.kill(pid, signal.SIGKILL)
        with open(self.log_file, "ab") as out:
            process = subprocess.Popen(self.command(install), env=self.environment(install), cwd=self.root,
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.state_file.write_text(json.dumps({
            "pid": process.pid, "url": self.url, "grpc_url": self.grpc_url, "metrics_url": self.metrics_url,
            "repository": str(self.repository), "log": str(self.log_file), "started": time.time(),
        }, indent=2))
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while not self.is_live():
            if process.poll() is not None:
                raise ServerError(f"tritonserver exited with {process.returncode} while starting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self._terminate(process.pid, grace_s=5)
                raise ServerError(f"tritonserver not live after {self.cfg.start_timeout_s} s:\n{self.log_tail()}")
            time.sleep(0.2)
        log.info("tritonserver %d live: HTTP %s, gRPC %s, metrics %s; log %s", process.pid, self.url,
                 self.grpc_url, self.metrics_url, self.log_file)
        return process.pid

    def pid(self) -> int | None:
        """The pid this folder's state file names, if that process is still a tritonserver."""
        if not self.state_file.is_file():
            return None
        pid = json.loads(self.state_file.read_text())["pid"]
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            return None
        return pid if cmdline.endswith(b"tritonserver") else None

    def leftover_stubs(self) -> list[int]:
        """Python backend stubs of this folder's repository whose server is gone. A stub busy loading a model
        when its server dies keeps running, and holds the dead server's sockets: clients of the next server
        on the same ports then wait on connections nobody answers."""
        found = []
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
                parent_cmd = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")[0]
            except (OSError, IndexError):
                continue
            if (len(argv) > 1 and argv[0].endswith(b"triton_python_backend_stub")
                    and argv[1].startswith(bytes(self.repository) + b"/") and not parent_cmd.endswith(b"tritonserver")):
                found.append(int(proc.name))
        return found

    def stop(self) -> bool:
        """Stops the server this folder started (by its pid); -> whether one was running."""
        pid = self.pid()
        if pid is None:
            return False
        self._terminate(pid, grace_s=self.cfg.exit_timeout_s + 10)
        self.state_file.unlink(missing_ok=True)
        log.info("tritonserver %d stopped", pid)
        return True

    @staticmethod
    def _terminate(pid: int, grace_s: float) -> None:
        """SIGTERM (the server unloads its models), then SIGKILL after grace_s."""
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                finished, _ = os.waitpid(pid, os.WNOHANG)  # reaps it when it is our child
            except ChildProcessError:
                finished = 0 if Path(f"/proc/{pid}").exists() else pid
            if finished:
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_file.is_file():
            return "(no log)"
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
