"""The compile stage end to end on the CPU (Inductor CPU, reference kernels): a torch.compile variant and an
AOTInductor package that reloads in a fresh process, both passing their parity check."""
import csv
import json
from pathlib import Path

import pytest
import torch

from pipeline.core import Manifest, Variant
from pipeline.variants import LOADERS, load_variant
from tests.conftest import TINY, run_pipeline, seed_store


@pytest.fixture(scope="module")
def compile_run(tmp_path_factory, store_template):
    """One tiny train -> compile -> validate run on the CPU for the stage tests below: the default Inductor
    entry, an entry asking for Triton kernels (which the CPU cannot run), and an AOTInductor package."""
    tmp = tmp_path_factory.mktemp("compile")
    artifacts = seed_store(store_template, tmp / "artifacts").parent
    entries = "compile.inductor.cpu=[{mode: default, precision: fp32}, {mode: default, kernels: triton}]"
    with pytest.MonkeyPatch.context() as patch:
        if not torch.cuda.is_available():  # as a user runs it: not in Triton's interpreter
            patch.delenv("TRITON_INTERPRET", raising=False)
        proc = run_pipeline([*TINY, f"artifacts_dir={artifacts}", "stage=[train,compile,validate]", "precision=fp32",
                             entries, "compile.aoti.devices=[cpu]"], cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Manifest.load(next((artifacts / "runs").glob("*/manifest.json")))


@pytest.mark.slow
def test_compile_stage_builds_inductor_and_aoti_variants(compile_run):
    manifest = compile_run
    compiled = manifest.stages["compile"]
    assert compiled["status"] == "ok"
    by_name = {v["name"]: v for v in compiled["variants"]}
    assert set(by_name) == {"inductor-fp32", "aoti-fp32"}
    assert by_name["inductor-fp32"]["backend"] == "inductor" and by_name["aoti-fp32"]["backend"] == "aoti"
    package = Path(by_name["aoti-fp32"]["artifact"])
    assert package.suffix == ".pt2" and package.exists()
    report = json.loads(Path(compiled["artifacts"]["compile_report"]).read_text())
    assert report["variants"]["aoti-fp32"]["fresh_process_topk_overlap"] == 1.0
    for name in by_name:
        assert report["variants"][name]["parity_topk_overlap"] >= 0.99
        assert compiled["metrics"][f"compile_seconds_{name}"] > 0

    # validate's loader answers with the package like every variant: (ids, scores) for a batch of histories.
    predict = load_variant(Variant(**by_name["aoti-fp32"]), torch.device("cpu"), top_k=20)
    history = torch.zeros(3, 16, dtype=torch.long)
    history[:, :4] = torch.arange(1, 5)
    ids, scores = predict(history, torch.full((3,), 4), None)
    assert ids.shape == (3, 20) and scores.shape == (3, 20)
    assert not torch.isin(ids, torch.arange(1, 5)).any()


def test_compile_backends_have_loaders():
    assert {"inductor", "aoti"} <= set(LOADERS)


def test_triton_entries_are_skipped_on_cpu(compile_run):
    """Asking for Triton kernels on the CPU names the reason; nothing else is built in their place (the
    variants are the other entries': test_compile_stage_builds_inductor_and_aoti_variants)."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the Triton entry builds")
    stage = compile_run.stages["compile"]
    assert [v["name"] for v in stage["variants"]] == ["inductor-fp32", "aoti-fp32"]
    report = json.loads(Path(stage["artifacts"]["compile_report"]).read_text())
    assert set(report["skipped"]) == {"inductor-triton-fp32"}
    assert "CUDA" in report["skipped"]["inductor-triton-fp32"]


def test_cuda_graph_refuses_modes_that_capture_themselves():
    from pipeline.core import PipelineError
    from pipeline.export.inductor import CompiledRetriever
    from pipeline.models import HSTU, Retriever

    retriever = Retriever(HSTU(num_items=30, max_len=8, dim=16, num_layers=1, num_heads=2), k=5).eval()
    with pytest.raises(PipelineError, match="max-autotune-no-cudagraphs"):
        CompiledRetriever(retriever, "max-autotune", "reference", cuda_graph=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: no capture")
def test_cuda_graph_variant_runs_uncaptured_on_the_cpu():
    """A cuda_graph variant loaded on a machine without CUDA answers like the plain retriever."""
    from pipeline.export.inductor import CompiledRetriever
    from pipeline.models import HSTU, Retriever

    torch.manual_seed(0)
    retriever = Retriever(HSTU(num_items=30, max_len=8, dim=16, num_layers=1, num_heads=2), k=5).eval()
    history = torch.randint(1, 31, (3, 8))
    lengths = torch.tensor([8, 3, 5])
    with torch.no_grad():
        expected_ids, expected_scores = retriever(history, lengths)
    compiled = CompiledRetriever(retriever, "default", "reference", cuda_graph=True)
    ids, scores = compiled(history, lengths)
    assert compiled.captured is not None and not compiled.captured.graphs
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(scores, expected_scores)


def test_a_spec_built_again_loads_from_inductors_cache():
    """What validate does after the compile stage: the same spec built around a fresh retriever (Dynamo reset
    in between) with the same first calls (a batch above 1, marked dynamic, then batch 1) is served from
    Inductor's FX graph cache and AOTAutograd's (which a frozen graph would bypass: a few seconds more per
    shape in every process that loads the spec), and answers as the first build did."""
    from torch._dynamo.utils import counters

    from pipeline.catalogue import VariantSpec, build
    from pipeline.models import HSTU, Retriever

    def fresh():
        torch.manual_seed(0)
        return Retriever(HSTU(num_items=30, max_len=8, dim=16, num_layers=1, num_heads=2), k=5).eval()

    spec = VariantSpec("inductor", "fp32")
    history, lengths = torch.randint(1, 31, (4, 8), generator=torch.Generator().manual_seed(1)), torch.tensor([8, 3, 5, 1])
    answers = []
    for _ in range(2):
        torch._dynamo.reset()
        counters.clear()
        predict = build(spec, fresh(), torch.device("cpu"))
        answers.append((predict(history, lengths), predict(history[:1], lengths[:1])))
    assert counters["inductor"]["fxgraph_cache_hit"] == 2, dict(counters["inductor"])  # batch 1 and the dynamic batch
    assert counters["inductor"]["fxgraph_cache_miss"] == 0
    assert counters["aot_autograd"]["autograd_cache_hit"] == 2, dict(counters["aot_autograd"])
    for first, again in zip(*answers):
        assert torch.equal(first[0], again[0])


def test_validate_reports_compile_seconds_from_the_compile_stage(compile_run):
    manifest = compile_run
    with open(manifest.stages["validate"]["artifacts"]["validate_table"]) as f:
        rows = {row["variant"]: row for row in csv.DictReader(f)}
    for name in ("inductor-fp32", "aoti-fp32"):
        stage_seconds = manifest.stages["compile"]["metrics"][f"compile_seconds_{name}"]
        assert float(rows[name]["compile_seconds"]) == pytest.approx(stage_seconds), name
        assert float(rows[name]["load_seconds"]) > 0, name
    assert rows["eager-fp32"]["compile_seconds"] == ""  # nothing compiled: no number made up
    assert float(rows["eager-fp32"]["load_seconds"]) > 0


def test_a_package_that_crashes_its_loader_is_a_clear_error(tmp_path):
    # A package linked by an unsuitable C++ toolchain segfaults the process that loads it (seen on the GPU host);
    # the fresh-process runner must name the signal and the likely cause instead of dying with it.
    from pipeline.core import PipelineError
    from pipeline.export.inductor import _run_fresh

    with pytest.raises(PipelineError, match="killed by SIGSEGV.*CXX"):
        _run_fresh("import ctypes; ctypes.string_at(0)", [], tmp_path, "the package does not load")


def test_a_corrupt_package_fails_in_the_fresh_process_with_its_error(tmp_path):
    from pipeline.core import PipelineError
    from pipeline.export.inductor import run_in_fresh_process

    package = tmp_path / "retriever.pt2"
    package.write_bytes(b"not a zip archive")
    with pytest.raises(PipelineError, match=r"failed in a fresh process \(exit status 1\)"):
        run_in_fresh_process(package, (torch.ones(1, 4, dtype=torch.long), torch.ones(1, dtype=torch.long)),
                             tmp_path / "fresh")
