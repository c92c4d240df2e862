import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Without a GPU the Triton kernels run in Triton's interpreter, which triton reads when its jit functions are
# defined: so before anything imports triton (torchao does, in the int8 tests, before test_kernels.py runs).
if os.environ.get("CUDA_VISIBLE_DEVICES", None) != "" and "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# A run small enough for CI's two cores; every stage still does its real work.
TINY = [
    "data.synthetic.num_users=120",
    "data.synthetic.num_items=80",
    "data.synthetic.max_len=24",
    "model.max_len=16",
    "model.dim=16",
    "train.epochs=2",
    "train.eval_every=1",
    "train.batch_size=64",
    "train.num_negatives=16",
    "validate.batch_sizes=[1,8]",
    "validate.warmup=1",
    "validate.iters=3",
    "validate.top_k=20",
]


def shared_data() -> Path:
    return Path(os.environ.get("GENREC_SHARED_DATA", ROOT.parent / "shared" / "data"))


def run_pipeline(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m pipeline ...` in a fresh process, from another working directory, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store, its tables made once for the session: making them (MLflow's migrations)
    takes seconds in every fresh process, and most tests are about what a run writes, not about a new store.
    The pipeline making a store of its own is left to the tests that do not seed one (test_end_to_end)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def seed_store(template: Path, artifacts: Path) -> Path:
    """artifacts/mlflow.db as a copy of the empty store: what a run finds there after a first one."""
    artifacts.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(template, artifacts / "mlflow.db"))


@pytest.fixture
def tiny_args(tmp_path, store_template):
    seed_store(store_template, tmp_path / "artifacts")
    return [*TINY, f"artifacts_dir={tmp_path / 'artifacts'}"]


def corrupt_weights(path: Path, size: int = 4096) -> None:
    """Overwrites up to `size` bytes in the middle of the largest tensor of a torch.save zip, leaving the zip
    structure intact (the file still loads, with wrong weights), as a disk or copy fault can."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size)
    with open(path, "r+b") as f:
        f.seek(largest.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start = largest.header_offset + 30 + name_len + extra_len
        count = min(size, largest.file_size)
        f.seek(start + (largest.file_size - count) // 2)
        f.write(bytes((i * 37 + 11) % 256 for i in range(count)))


def pytest_runtest_logreport(report):
    """GENREC_TEST_TIMES=FILE: each test phase's seconds appended as it ends, so that a suite cut off by a time
    limit (scripts/gpu_run.sh tests) still says where its time went."""
    path = os.environ.get("GENREC_TEST_TIMES")
    if path and (report.when == "call" or report.duration >= 1.0):
        with open(path, "a") as f:
            f.write(f"{report.duration:8.1f} s  {report.when:8s} {report.outcome:7s} {report.nodeid}\n")
