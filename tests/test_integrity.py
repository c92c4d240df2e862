"""Digests written when files are made and checked when they are read: an ONNX model with its external data,
a folder, a copy; then a TINY run whose model.pt gets 4 KB overwritten in the middle (zip intact): validate and
promote refuse it naming the file, and nothing is registered in a real sqlite MLflow store."""
import shutil
import subprocess

import pytest
import torch
from mlflow import MlflowClient

from conftest import TINY, corrupt_weights, run_pipeline, seed_store
from pipeline.core import Variant
from pipeline.export.onnx import export_onnx
from pipeline.integrity import IntegrityError, copy_verified, sidecar, verify_digest, write_digest
from pipeline.models import HSTU, Retriever
from pipeline.variants import load_variant


def test_onnx_external_data_is_part_of_the_digest_and_sha256sum_reads_it(tmp_path):
    torch.manual_seed(0)
    retriever = Retriever(HSTU(40, 8, dim=16, num_layers=1, num_heads=2), k=5).eval()
    export = export_onnx(retriever, tmp_path / "m.onnx", None, external_data_mb=0)  # weights beside it
    data = tmp_path / "m.onnx.data"
    assert data.is_file() and sidecar(export.path).read_text().splitlines()[1].endswith("  m.onnx.data")
    assert subprocess.run(["sha256sum", "-c", "--quiet", sidecar(export.path).name], cwd=tmp_path).returncode == 0
    variant = Variant("onnxruntime-fp32", "onnxruntime", "fp32", str(export.path), "onnx",
                      {"provider": "CPUExecutionProvider", "top_k": 5, "num_threads": 1})
    load_variant(variant, torch.device("cpu"), 5)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=r"m\.onnx\.data is corrupt: its sha256 is [0-9a-f]{64}, but [0-9a-f]{64}"):
        load_variant(variant, torch.device("cpu"), 5)


def test_a_folder_and_a_copy(tmp_path):
    folder = tmp_path / "variant"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"a" * 100)
    (folder / "sub" / "b.json").write_text("{}")
    first = write_digest(folder)
    assert verify_digest(folder) == first
    (folder / "sub" / "b.json").unlink()
    with pytest.raises(IntegrityError, match=r"sub/b\.json is missing"):
        verify_digest(folder)

    one = tmp_path / "one.bin"
    one.write_bytes(b"x" * 10)
    write_digest(one)
    copy = copy_verified(one, tmp_path / "renamed.bin")
    assert verify_digest(copy) == verify_digest(one)
    one.write_bytes(b"y" * 10)
    with pytest.raises(IntegrityError, match="one.bin is corrupt"):
        copy_verified(one, tmp_path / "again.bin")
    assert not (tmp_path / "again.bin").exists()


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_never_validated_or_promoted(tmp_path, store_template):
    artifacts = seed_store(store_template, tmp_path / "artifacts").parent
    args = [*TINY, f"artifacts_dir={artifacts}", "precision=fp32"]
    trained = run_pipeline([*args, "stage=train"], cwd=tmp_path)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    (run_dir,) = (artifacts / "runs").iterdir()
    checkpoint = run_dir / "model.pt"
    good, good_digest = checkpoint.read_bytes(), sidecar(checkpoint).read_text()
    client = MlflowClient(f"sqlite:///{artifacts / 'mlflow.db'}")

    def registered() -> list:
        return client.search_model_versions("name = 'genrec'")

    corrupt_weights(checkpoint)
    torch.load(checkpoint, weights_only=True)  # the zip is intact: only the digest can tell
    refused = run_pipeline([*args, "stage=[validate,promote]", f"from_run={run_dir.name}"], cwd=tmp_path)
    output = refused.stdout + refused.stderr
    assert refused.returncode == 1, output
    assert f"{checkpoint} is corrupt: its sha256 is" in output and good_digest.split()[0] in output
    assert "Traceback" not in output
    assert registered() == []

    # Corrupted before its digest was written (the digest matches the damaged bytes): validate compares
    # eager-fp32's quality with the train stage's own figure and refuses.
    write_digest(checkpoint)
    refused = run_pipeline([*args, "stage=[validate,promote]", f"from_run={run_dir.name}"], cwd=tmp_path)
    output = refused.stdout + refused.stderr
    assert refused.returncode == 1, output
    assert f"eager-fp32 ({checkpoint}) scores test HR@10" in output and "but the train stage measured" in output
    assert "gates.reference_hr10_tolerance" in output
    assert registered() == []

    # The same run with its checkpoint restored validates and promotes.
    checkpoint.write_bytes(good)
    sidecar(checkpoint).write_text(good_digest)
    accepted = run_pipeline([*args, "stage=[validate,promote]", f"from_run={run_dir.name}"], cwd=tmp_path)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert [v.tags["variant"] for v in registered()] == ["eager-fp32"]
    copied = tmp_path / "copied"
    shutil.copytree(artifacts / "runs", copied)  # a copied run folder keeps its digests
    assert verify_digest(copied / run_dir.name / "model.pt") == good_digest.split()[0]
