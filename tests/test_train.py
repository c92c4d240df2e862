"""train.fit: the published protocol (train on all but the test item, fixed epochs) and its refusals."""
import pytest
from mlflow import MlflowClient

from conftest import TINY, run_pipeline, seed_store


def _train_run(artifacts):
    client = MlflowClient(f"sqlite:///{artifacts / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("genrec")
    return client, next(r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "train")


def test_all_but_test_trains_fixed_epochs_without_validation_metrics(tmp_path, store_template):
    artifacts = seed_store(store_template, tmp_path / "artifacts").parent
    args = [*TINY, "train.epochs=3", "train.patience=1", f"artifacts_dir={artifacts}", "stage=train", "train.fit=all_but_test"]
    result = run_pipeline(args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    client, train = _train_run(artifacts)
    metrics = train.data.metrics
    # No early stop (patience=1 would have stopped a holdout fit that fails to improve) and nothing chosen
    # on validation: every epoch runs, and the validation item, now a training target, is not scored.
    assert metrics["epochs_run"] == 3 and metrics["best_epoch"] == 3
    assert not any(key.startswith("valid_") for key in metrics), sorted(metrics)
    assert 0.0 <= metrics["hr10"] <= 1.0
    assert [m.step for m in client.get_metric_history(train.info.run_id, "train_loss")] == [1, 2, 3]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.fit=everything"], "valid choices: holdout, all_but_test"),
        (["train.fit=all_but_test", "train.refit=true"], "train.refit=true needs train.fit=holdout"),
    ],
)
def test_bad_fit_is_refused(tmp_path, store_template, overrides, expected):
    seed_store(store_template, tmp_path / "artifacts")
    result = run_pipeline([*TINY, f"artifacts_dir={tmp_path / 'artifacts'}", "stage=train", *overrides], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and expected in output, output


def test_training_leaves_the_matmul_settings_inductor_keys_its_cache_on(tmp_path):
    """fit() turns TF32 on for training and must leave the process as it found it, as Inductor's cache reads
    it: restoring allow_tf32=False instead turned the default "none" into "ieee", so the graphs compiled after
    training in one process (stage=all) were never found by validate or the serving engine in another."""
    import torch

    from pipeline.serving.config import load_config
    from pipeline.stages.train import _tf32_matmul, fit

    def settings():  # torch._inductor.codecache.FxGraphHashDetails.cuda_matmul_settings
        return (torch.backends.cuda.matmul.fp32_precision,
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)

    before = settings()
    cfg = load_config([*TINY, f"artifacts_dir={tmp_path}", "train.epochs=1"])
    fit(cfg, torch.device("cpu"), tmp_path, lambda *args, **kwargs: None)
    assert settings() == before == ("none", True, True)
    with _tf32_matmul(True):  # as on CUDA: TF32 while training, then the settings as they were
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert settings() == before
