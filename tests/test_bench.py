"""The benchmark on the CPU: a real (small) run writes its files, bad input is refused, and the precision
study separates the encoder's rounding from the table's."""
import csv

import pytest
import torch

from pipeline.bench import precision
from pipeline.bench.run import main as bench_main
from pipeline.bench.workload import Workload

TINY = Workload("tiny", num_items=400, max_len=12, dim=16, num_layers=1, num_heads=2, top_k=20, batch_sizes=(1, 4))


@pytest.fixture
def bench_globals():
    """The bench sets Inductor's freezing and the thread count for its process: put them back after.
    (Not monkeypatch: undoing a setattr on torch's config module deletes the option.)"""
    import torch._inductor.config as inductor_config

    freezing, threads = inductor_config.freezing, torch.get_num_threads()
    yield
    inductor_config.freezing = freezing
    torch.set_num_threads(threads)


def test_cpu_bench_writes_its_table_csv_and_plot(tmp_path, bench_globals):
    code = bench_main(["--workload", "retrieval-cpu", "--variants", "eager-fp32", "eager-bf16", "--batch-sizes", "1", "4",
                       "--warmup", "1", "--iters", "2", "--no-mlflow", "--out", str(tmp_path)])
    assert code == 0
    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["batch_size"]) for r in rows] == [
        ("eager-fp32", "1"), ("eager-fp32", "4"), ("eager-bf16", "1"), ("eager-bf16", "4")]
    assert all(float(r["p50_ms"]) > 0 and float(r["users_per_s"]) > 0 for r in rows)
    overlaps = {r["variant"]: float(r["topk_overlap"]) for r in rows if r["topk_overlap"]}
    assert overlaps["eager-fp32"] == 1.0 and 0.5 < overlaps["eager-bf16"] <= 1.0  # fp32 is the reference
    assert "eager-bf16" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "latency_vs_batch.png").stat().st_size > 0


def test_unknown_variant_is_refused_with_the_valid_names(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_main(["--variants", "eager-fp32", "eager-fp64", "--no-mlflow", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "eager-fp64" in err and "eager-bf16" in err
    assert not (tmp_path / "bench.csv").exists()


def test_precision_study_separates_the_encoder_from_the_table():
    results = precision.study(TINY, users=8, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert results["fp32 encoder, fp32 table (the reference against itself)"] == 1.0
    assert all(0.0 < value <= 1.0 for value in results.values())
    assert precision.overlap(torch.tensor([[1, 2, 3]]), torch.tensor([[3, 4, 5]])) == pytest.approx(1 / 3)
