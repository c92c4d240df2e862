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
    code = bench_main(["--variants", "eager-fp32", "eager-bf16", "--no-mlflow", "--out", str(tmp_path),
                       "bench.workload=retrieval-cpu", "bench.batch_sizes=[1,4]", "bench.warmup=1", "bench.iters=2"])
    assert code == 0
    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["batch_size"]) for r in rows] == [
        ("eager-fp32", "1"), ("eager-fp32", "4"), ("eager-bf16", "1"), ("eager-bf16", "4")]
    assert all(float(r["p50_ms"]) > 0 and float(r["users_per_s"]) > 0 for r in rows)
    overlaps = {r["variant"]: float(r["topk_overlap"]) for r in rows if r["topk_overlap"]}
    assert overlaps["eager-fp32"] == 1.0 and 0.5 < overlaps["eager-bf16"] <= 1.0  # fp32 is the reference
    assert "| eager-bf16 (baseline) |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "latency_vs_batch.png").stat().st_size > 0


def test_unknown_variant_is_refused_with_the_valid_names(tmp_path, capsys):
    for name in ("eager-fp64", "compile-fp32", "onnxruntime-fp32"):
        with pytest.raises(SystemExit) as exc:
            bench_main(["--variants", "eager-fp32", name, "--no-mlflow", "--out", str(tmp_path)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert name in err
    assert "eager-bf16" in err or "validate" in err
    assert not (tmp_path / "bench.csv").exists()


def test_bad_config_override_is_refused(tmp_path, capsys):
    for override, named in (("bench.iter=3", "bench.iter"), ("bench.workload=retrieval-2m", "retrieval-2m")):
        with pytest.raises(SystemExit) as exc:
            bench_main(["--no-mlflow", "--out", str(tmp_path), override])
        assert exc.value.code == 2
        assert named in capsys.readouterr().err


def test_bench_lists_only_catalogue_specs_and_parts_only_when_asked():
    """Every default bench name is a catalogue spec's name (parse -> name round trip), the GPU list holds the
    compile stage's default captured-call variant, and parts are not variants."""
    from pipeline.bench.run import Part, bench_parts, bench_specs
    from pipeline.catalogue import VariantSpec
    from pipeline.serving.config import load_config

    cfg = load_config(["+bench=default"])
    for device in ("cpu", "cuda"):
        specs = bench_specs(cfg.bench, torch.device(device))
        assert all(VariantSpec.parse(s.name) == s for s in specs)
        assert {"eager-fp32", "eager-bf16"} <= {s.name for s in specs if s.baseline}
    gpu = {s.name: s for s in bench_specs(cfg.bench, torch.device("cuda"))}
    captured = gpu["inductor-max-autotune-graph-triton-bf16"]
    assert (captured.mode, captured.kernels, captured.cuda_graph) == ("max-autotune-no-cudagraphs", "triton", True)
    assert gpu["inductor-max-autotune-bf16"].baseline and not captured.baseline
    parts = bench_parts(cfg.bench, torch.device("cuda"))
    assert parts and all(isinstance(p, Part) and p.name.startswith("part-") for p in parts)
    assert not {p.name for p in parts} & set(gpu)


def test_precision_study_separates_the_encoder_from_the_table():
    results = precision.study(TINY, users=8, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert results["fp32 encoder, fp32 table (the reference against itself)"] == 1.0
    assert all(0.0 < value <= 1.0 for value in results.values())
    assert precision.overlap(torch.tensor([[1, 2, 3]]), torch.tensor([[3, 4, 5]])) == pytest.approx(1 / 3)
