"""pipeline.bench.quality: trains, evaluates every variant against fp32 eager, and says so in a table;
bad input gets a clear error."""
import csv

import pytest
import torch

from pipeline.bench import quality
from pipeline.bench.parity import head
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.data import generate_synthetic, leave_one_out
from pipeline.evaluation import evaluate_full_ranking
from pipeline.gates import gate_for
from pipeline.serving.config import load_config
from pipeline.models import HSTU, Retriever

USERS, K = 150, 20


TINY_MODEL = ["model.max_len=20", "model.dim=16", "model.num_layers=1", "model.num_heads=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """--train with the pipeline's config and overrides: the train stage's code trains it."""
    out = tmp_path_factory.mktemp("quality")
    code = quality.main(["--train", "--device", "cpu", "--out", str(out), "data=synthetic", *TINY_MODEL,
                         "train.epochs=2", "train.num_negatives=16", "train.batch_size=256", "train.fit=all_but_test",
                         f"quality.users={USERS}", f"validate.top_k={K}", f"artifacts_dir={out}",
                         f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}"])
    with open(out / "quality.csv") as f:
        rows = {row["variant"]: row for row in csv.DictReader(f)}
    return code, out, rows


def test_quality_trains_then_compares_each_variant_with_fp32_eager(trained):
    code, out, rows = trained
    assert code == 0
    assert list(rows) == ["eager-fp32", "eager-bf16", "inductor-fp32"]  # quality.variants.cpu, catalogue names
    model, payload = load_checkpoint(out / "model.pt")
    assert payload["extra"]["metrics"]["epochs_run"] == 2
    assert 0 <= payload["extra"]["metrics"]["hr10"] <= 1  # the train stage's fit: its full-ranking test metrics
    torch.manual_seed(0)
    fresh = HSTU(num_items=payload["num_items"], max_len=20, dim=16, num_layers=1, num_heads=2)
    assert not torch.equal(model.item_embedding.weight, fresh.item_embedding.weight)  # it trained
    # The reference row, recomputed another way: full-ranking scores of the saved model, not its top-K.
    split = head(leave_one_out(generate_synthetic(**payload["extra"]["data"]["synthetic"]), 20).test, USERS)
    expected = evaluate_full_ranking(Retriever(model, k=K).score_all, split, [10], 64, torch.device("cpu"))
    assert float(rows["eager-fp32"]["hr10"]) == pytest.approx(expected["hr10"])
    assert float(rows["eager-fp32"]["ndcg10"]) == pytest.approx(expected["ndcg10"])
    # compile in fp32 answers as eager; bf16 rounds scores, and the table shows it.
    assert float(rows["inductor-fp32"]["topk_overlap"]) > 0.99
    assert float(rows["inductor-fp32"]["max_abs_err"]) < 1e-4
    assert float(rows["eager-bf16"]["max_abs_err"]) > 1e-4
    bf16 = rows["eager-bf16"]
    gate = gate_for(load_config([]).gates, "bf16")  # the pipeline's own gate: overlap and HR@10, no score error for bf16
    gates_hold = float(bf16["hr10_delta"]) >= -gate.max_hr10_drop and float(bf16["topk_overlap"]) >= gate.min_topk_overlap
    assert bf16["passes"] == ("yes" if gates_hold else "no")
    # fp32 is also held to its score error: inductor-fp32 passes on all three parts
    assert rows["inductor-fp32"]["passes"] == "yes" and rows["inductor-fp32"]["gate_reason"] == "passed"
    assert "| eager-bf16 |" in (out / "quality.md").read_text()


def test_quality_logs_each_variant_to_mlflow(trained):
    """A real sqlite store: one run per invocation, a nested run per variant with the CSV's numbers."""
    import mlflow

    _, out, rows = trained
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("genrec-quality")
    runs = client.search_runs([experiment.experiment_id])
    variants = {r.data.tags["variant"]: r for r in runs if "variant" in r.data.tags}
    assert set(variants) == set(rows)
    for name, run in variants.items():
        assert run.data.metrics["hr10"] == pytest.approx(float(rows[name]["hr10"]))
        assert run.data.metrics["parity_topk_overlap"] == pytest.approx(float(rows[name]["topk_overlap"]))
        assert run.data.tags["passes"] == rows[name]["passes"]
    parent = [r for r in runs if "variant" not in r.data.tags]
    assert len(parent) == 1
    assert {a.path for a in client.list_artifacts(parent[0].info.run_id)} == {"quality.csv", "quality.md"}
    assert (out / "mlruns").is_dir()  # the artifacts sit beside the store, not in the project


def test_quality_reads_the_dataset_a_checkpoint_names(trained, tmp_path):
    """--checkpoint takes the data config saved with it; the answer is the --train run's."""
    _, out, rows = trained
    assert quality.main(["--checkpoint", str(out / "model.pt"), "--device", "cpu", f"quality.users={USERS}",
                         f"validate.top_k={K}", "--variants", "eager-fp32", "--out", str(tmp_path), "--no-mlflow"]) == 0
    with open(tmp_path / "quality.csv") as f:
        again = list(csv.DictReader(f))
    assert [r["variant"] for r in again] == ["eager-fp32"]
    assert again[0]["hr10"] == rows["eager-fp32"]["hr10"]


def test_quality_generates_the_synthetic_data_a_train_stage_checkpoint_saved(tmp_path):
    """The train stage saves its data config as a plain dict, synthetic options included: quality must
    generate that data (100 items here), not the defaults (1,000), or the item-count check refuses it."""
    options = {"num_users": 120, "num_items": 100, "min_len": 5, "max_len": 20, "seed": 3}
    model_cfg = {"name": "hstu", "max_len": 20, "dim": 16, "num_layers": 1, "num_heads": 2, "l2_norm": True}
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "model.pt", HSTU(num_items=100, max_len=20, dim=16, num_layers=1, num_heads=2),
                                 model_cfg, 100, extra={"data": {"name": "synthetic", "root": None, "synthetic": options}})
    assert quality.main(["--checkpoint", str(checkpoint), "--device", "cpu", "validate.top_k=10", "--variants",
                         "eager-fp32", "--out", str(tmp_path), "--no-mlflow"]) == 0
    with open(tmp_path / "quality.csv") as f:
        (row,) = list(csv.DictReader(f))
    split = leave_one_out(generate_synthetic(**options), 20).test
    model, _ = load_checkpoint(checkpoint)
    expected = evaluate_full_ranking(Retriever(model, k=10).score_all, split, [10], 64, torch.device("cpu"))
    assert float(row["hr10"]) == pytest.approx(expected["hr10"])


def test_quality_bad_input_is_a_clear_error(trained, tmp_path, capsys):
    _, out, _ = trained
    assert quality.main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path), "--no-mlflow"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((out / "model.pt").read_bytes()[:100])
    assert quality.main(["--checkpoint", str(corrupt), "--out", str(tmp_path), "--no-mlflow"]) == 2
    assert "corrupt.pt has no digest" in capsys.readouterr().err
    intact = (out / "model.pt.sha256").read_text().split()[0]
    (tmp_path / "corrupt.pt.sha256").write_text(f"{intact}  corrupt.pt\n")  # the digest of the whole file
    assert quality.main(["--checkpoint", str(corrupt), "--out", str(tmp_path), "--no-mlflow"]) == 2
    assert "corrupt.pt is corrupt: its sha256 is" in capsys.readouterr().err
    # Names are the catalogue's: an old bench name, or one the rule does not write, is refused by name.
    for name in ("compile-fp32", "nope"):
        assert quality.main(["--checkpoint", str(out / "model.pt"), "--device", "cpu", "--variants", name,
                             "--out", str(tmp_path), "--no-mlflow"]) == 2
        assert f"'{name}'" in capsys.readouterr().err
    # A checkpoint whose item count is not the dataset's: refused, not evaluated on the wrong items.
    model, payload = load_checkpoint(out / "model.pt")
    other = save_checkpoint(tmp_path / "other.pt", HSTU(num_items=50, max_len=20, dim=16, num_layers=1, num_heads=2),
                            payload["model_config"], 50, extra={"data": {"name": "synthetic"}})
    assert quality.main(["--checkpoint", str(other), "--device", "cpu", "--out", str(tmp_path), "--no-mlflow"]) == 2
    assert "not the data it was trained on" in capsys.readouterr().err
    # A typo in a config key: the config system refuses it, naming the key.
    assert quality.main(["--train", "data=synthetic", "train.epoch=2", "--out", str(tmp_path), "--no-mlflow"]) == 2
    assert "train.epoch" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one of --checkpoint / --train
        quality.main(["--out", str(tmp_path)])
    assert "one of the arguments" in capsys.readouterr().err
