"""Bad config is refused before anything runs, with the valid choices in the message."""
import pytest

from conftest import run_pipeline


@pytest.mark.parametrize(
    "override, expected",
    [
        ("precision=fp8", "fp32, fp16, bf16, int8"),
        ("device=tpu", "auto, cpu, cuda"),
        ("stage=bogus", "train, compile, trt, onnx, int8, validate, promote, deploy"),
        ("stage=[train,bogus]", "unknown stage 'bogus'"),
        ("model=transformerxl", "hstu"),
        ("data=netflix", "ml-1m"),
        ("train.learning_rat=0.1", "learning_rat"),
        ("nonsense=1", "nonsense"),
    ],
)
def test_bad_config_exits_nonzero_with_choices(tmp_path, override, expected):
    result = run_pipeline([override, f"artifacts_dir={tmp_path}"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert expected in output, output
    assert not (tmp_path / "mlflow.db").exists(), "a refused config must not create runs"


def test_config_error_lists_model_options(tmp_path):
    result = run_pipeline(["model=transformerxl", f"artifacts_dir={tmp_path}"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert "sasrec" in output and "hstu" in output, output
