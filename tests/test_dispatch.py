"""The kernels' per-shape dispatch between our Triton kernels and their references (pipeline.kernels.dispatch):
timings injected so that the choice is deterministic, kernels under the Triton interpreter on the CPU."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline import kernels
from pipeline.kernels import dispatch, retrieval_top_k_reference

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported (tests/conftest.py sets it)",
                allow_module_level=True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def fresh_choices():
    dispatch.reset()
    yield
    dispatch.reset()


def _timer(costs: dict[str, float], calls: list | None = None):
    """ms by the option's algorithm (the first word of its label); each option still runs once."""
    def timer(label, fn):
        fn()
        if calls is not None:
            calls.append(label)
        return costs[label.split(" ")[0]]
    return timer


def _case(batch, num_items, dim=16, hist_len=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, dim, generator=gen)
    table = torch.randn(num_items + 1, dim, generator=gen)
    history = torch.randint(1, num_items + 1, (batch, hist_len), generator=gen)
    return query.to(DEVICE), table.to(DEVICE), history.to(DEVICE)


def _crowded(batch=3):
    """Row 0's top 20 all in the first chunk of 64 items: a config keeping 8 per chunk marks it unsure."""
    query, table, history = _case(batch, 300, hist_len=3, seed=1)
    history[:] = 0
    table[1:21] = 5 * query[0] + 0.01 * torch.arange(20, device=DEVICE)[:, None]
    return query, table, history


def _candidates(query, table, history, k):
    with kernels.use("triton", op="retrieval"):
        return kernels.retrieval_top_k_candidates(query, table, history, k)


# On the interpreter the top-K's options are "passes" (chunks of 64 items, 8 kept: rows may be unsure) and
# "gemv" (all 64 kept: exact); the other ops' kernel option is "triton".
def test_the_reference_top_k_runs_where_it_was_timed_faster():
    query, table, history = _case(3, 40)
    with dispatch.timed_by(_timer({"reference": 1.0, "passes": 2.0, "gemv": 3.0})):
        scores, ids, unsure = _candidates(query, table, history, 10)
        with kernels.use("triton"):
            assert not kernels.needs_check(query, table, 10)  # exact: finish() need not read `unsure` back
    ref_scores, ref_ids = retrieval_top_k_reference(query, table, history, 10)
    assert torch.equal(scores, ref_scores) and torch.equal(ids, ref_ids) and not unsure.any()
    [row] = kernels.dispatch_log()
    assert (row["op"], row["algorithm"], row["ms"], row["reference_ms"]) == ("retrieval", "reference", 1.0, 1.0)


@pytest.mark.parametrize("costs,algorithm,check", [
    ({"reference": 1.0, "passes": 2.0, "gemv": 0.5}, "gemv", False),   # keeps whole chunks: no check
    ({"reference": 1.0, "passes": 0.5, "gemv": 2.0}, "passes", True),   # may mark rows: checked
])
def test_the_kernel_runs_where_it_was_timed_faster(costs, algorithm, check):
    query, table, history = _case(3, 300)
    with dispatch.timed_by(_timer(costs)):
        scores, ids, unsure = _candidates(query, table, history, 5)
        with kernels.use("triton"):
            assert kernels.needs_check(query, table, 5) is check
    assert kernels.dispatch_log()[0]["algorithm"] == algorithm
    ref_scores, _ = retrieval_top_k_reference(query, table, history, 5)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=0)


def test_a_config_that_leaves_rows_unsure_pays_for_the_check():
    """Timed alone the passes config is the fastest; with the recomputation its unsure row costs, the
    reference. Where it leaves no row unsure (k within what a chunk keeps), it wins."""
    costs = {"reference": 1.0, "passes": 0.5, "gemv": 2.0}
    query, table, history = _crowded()
    with dispatch.timed_by(_timer(costs)):
        _candidates(query, table, history, 20)
    assert kernels.dispatch_log()[0]["algorithm"] == "reference"
    penalties = {algorithm: extra for op, _, algorithm, _, _, extra in dispatch.TUNING_LOG}
    assert penalties == {"reference": 0.0, "passes": 1.0, "gemv": 0.0}

    dispatch.reset()
    with dispatch.timed_by(_timer(costs)):
        _candidates(query, table, history, 5)
    assert kernels.dispatch_log()[0]["algorithm"] == "passes"


def test_the_tuner_times_each_shape_once():
    """Batch sizes of one power-of-two bucket share a choice; calls after the first do not time again."""
    calls = []
    query, table, history = _case(8, 100)
    with dispatch.timed_by(_timer({"reference": 1.0, "passes": 2.0, "gemv": 3.0}, calls)):
        for batch in (3, 4, 3, 4):
            _candidates(query[:batch], table, history[:batch], 5)
        assert len(calls) == 3  # the reference and the two configs, once
        for batch in (5, 8, 6):
            _candidates(query[:batch], table, history[:batch], 5)
        assert len(calls) == 6
    assert [row["key"][:4] for row in kernels.dispatch_log()] == ["(4, ", "(8, "]


def test_untimed_choice_is_the_kernel_and_is_checked():
    """Without a timer (the CPU) the kernel's default runs untimed, and finish() keeps its check."""
    query, table, history = _crowded()
    scores, ids, unsure = _candidates(query, table, history, 20)
    assert unsure.tolist() == [True, False, False]
    [row] = kernels.dispatch_log()
    assert row["algorithm"] == "passes" and row["timed"] == 0
    with kernels.use("triton"):
        assert kernels.needs_check(query, table, 20)


def _retriever(num_items=120, max_len=12, k=20):
    from pipeline.models import HSTU, Retriever

    torch.manual_seed(0)
    model = HSTU(num_items=num_items, max_len=max_len, dim=16, num_layers=2, num_heads=2, dropout=0.0,
                 linear_dropout=0.0)
    retriever = Retriever(model, k=k).to(DEVICE).eval().freeze()
    history = torch.randint(1, num_items + 1, (8, max_len), device=DEVICE)
    lengths = torch.tensor([12, 5, 1, 12, 7, 3, 9, 12], device=DEVICE)
    history[torch.arange(max_len, device=DEVICE)[None, :] >= lengths[:, None]] = 0
    return retriever, history, lengths


@pytest.mark.parametrize("passes_ms,trusted", [(2.0, True), (0.1, False)])
def test_finish_skips_the_check_only_where_the_choice_is_exact(passes_ms, trusted):
    """finish() given rows marked unsure: where the reference ran it returns the answer as it is (no host
    sync); where the kernel that may cut rows ran, it recomputes them. (k=5: within what a chunk keeps, so
    the tuning call leaves no row unsure and the kernel is not charged the check.)"""
    retriever, history, lengths = _retriever(k=5)
    costs = {"reference": 1.0, "passes": passes_ms, "gemv": 3.0, "triton": 2.0}
    with torch.no_grad(), kernels.use("triton"), dispatch.timed_by(_timer(costs)):
        ids, scores, unsure, query = retriever.candidates(history, lengths)
        all_marked = torch.ones_like(unsure)
        fixed_ids, fixed_scores = retriever.finish(history, ids, scores, all_marked, query)
        with kernels.use("reference"):
            ref_ids, ref_scores = retriever(history, lengths)
    assert (fixed_ids is ids) is trusted
    torch.testing.assert_close(fixed_scores, ref_scores, atol=1e-4, rtol=0)
    if not trusted:
        assert torch.equal(fixed_ids, ref_ids)  # recomputed by the reference itself


def test_attention_and_gate_references_in_the_ops_match_the_kernels():
    """Where the reference wins, the custom ops run it with the bias and masks the kernels derive: the
    same function as the kernel (padding rows included), in the kernel's layout."""
    from pipeline.kernels.hstu_attention import hstu_attention_positional
    from pipeline.kernels.triton_hstu import fused_attention

    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(2, 19, 3 * 2 * 8, generator=gen).to(DEVICE)
    v, q, k = (t.view(2, 19, 2, 8) for t in wide.split([16, 16, 16], dim=-1))
    weight = (0.1 * torch.randn(2 * 24 - 1, generator=gen)).to(DEVICE)
    lengths = torch.tensor([19, 7], device=DEVICE)
    with kernels.use("triton"), dispatch.timed_by(_timer({"reference": 1.0, "triton": 2.0})):
        out = kernels.hstu_attention(q, k, v, mask=None, lengths=lengths, max_len=24, bias=None,
                                     position_weight=weight, silu_inputs=True)
        x, u = wide[..., :16], wide[..., 16:32]
        gated = kernels.layer_norm_gate(x.contiguous(), u, 1e-6, silu_u=True)
    assert torch.equal(out, hstu_attention_positional(q, k, v, weight, lengths, 24, True)) and out.is_contiguous()
    torch.testing.assert_close(out, fused_attention(q, k, v, weight, lengths, 24, True), atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(gated, kernels.layer_norm_gate_reference(x, u, 1e-6, True))
    assert {(row["op"], row["algorithm"]) for row in kernels.dispatch_log()} == {
        ("hstu_attention", "reference"), ("ln_gate", "reference")}


def test_compiled_triton_retriever_traces_once_per_batch_regime_without_graph_breaks():
    """CompiledRetriever with our kernels: one graph for batch 1 and one for every larger batch (and as
    many for its reference twin, timed against it), no graph break at the custom ops or the kernel switch,
    and each option timed once per shape bucket."""
    from torch._dynamo.utils import counters

    from pipeline.export.inductor import CompiledRetriever

    retriever, history, lengths = _retriever()
    torch._dynamo.reset()
    counters.clear()
    compiled = CompiledRetriever(retriever, "default", "triton", compiler="eager")
    costs = {"reference": 2.0, "passes": 1.0, "gemv": 3.0, "triton": 1.0}
    with dispatch.timed_by(_timer(costs)):
        for batch in (1, 3, 5, 8, 1, 3, 8):
            compiled(history[:batch], lengths[:batch])
        assert counters["stats"]["unique_graphs"] == 4
        for batch in (2, 6, 7):
            compiled(history[:batch], lengths[:batch])
    assert counters["stats"]["unique_graphs"] == 4
    assert not counters["graph_break"]
    timings: dict = {}
    for op, key, *_ in dispatch.TUNING_LOG:
        timings[(op, key)] = timings.get((op, key), 0) + 1
    options = {"retriever": 2, "retrieval": 3, "hstu_attention": 2, "ln_gate": 2}
    assert timings and all(n == options[op] for (op, _), n in timings.items())
    assert {key[0] for op, key in timings if op == "retrieval"} == {1, 2, 4, 8}
    assert {row["algorithm"] for row in kernels.dispatch_log() if row["op"] == "retriever"} == {"triton"}
    torch._dynamo.reset()


def test_timestamps_that_the_model_ignores_do_not_trace_or_tune_again():
    """The build's validate passes the dataset's timestamps and the serving engine none, for a model without a
    time bias: both must reach one traced graph and one whole-call choice, or the engine compiles every batch
    bucket again at load (seen on the H200: 117 s under max-autotune instead of 15 s)."""
    from torch._dynamo.utils import counters

    from pipeline.export.inductor import CompiledRetriever

    retriever, history, lengths = _retriever()
    assert not retriever.encoder.time_bias
    times = torch.arange(history.numel()).view_as(history)
    torch._dynamo.reset()
    counters.clear()
    compiled = CompiledRetriever(retriever, "default", "triton", compiler="eager")
    costs = {"reference": 2.0, "passes": 1.0, "gemv": 3.0, "triton": 1.0}
    with dispatch.timed_by(_timer(costs)):
        with_times = compiled(history[:3], lengths[:3], times[:3])
        graphs = counters["stats"]["unique_graphs"]
        without = compiled(history[:3], lengths[:3])
    assert counters["stats"]["unique_graphs"] == graphs
    assert sum(1 for op, *_ in dispatch.TUNING_LOG if op == "retriever") == 2  # ours and the twin, timed once
    torch.testing.assert_close(with_times, without)
    torch._dynamo.reset()


@pytest.mark.parametrize("reference_ms,served_by", [(1.0, "reference"), (3.0, "triton")])
def test_compiled_triton_retriever_serves_a_bucket_by_its_reference_twin_where_faster(reference_ms, served_by):
    """The whole call against the same spec with the reference kernels: where the twin was timed faster it
    answers (the Triton graph is not called again for that bucket), else ours; the answer is the same."""
    from pipeline.export.inductor import CompiledRetriever

    retriever, history, lengths = _retriever()
    torch._dynamo.reset()
    compiled = CompiledRetriever(retriever, "default", "triton", compiler="eager")
    calls = []
    triton_graph = compiled.compiled
    compiled.compiled = lambda *args: calls.append(args[0].shape[0]) or triton_graph(*args)
    costs = {"reference": reference_ms, "passes": 1.0, "gemv": 3.0, "triton": 2.0}
    with dispatch.timed_by(_timer(costs)):
        ids, scores = compiled(history[:3], lengths[:3])
        timed = len(calls)
        ids, scores = compiled(history[:3], lengths[:3])
    assert len(calls) == timed + (served_by == "triton")
    # Decided once per shape: later calls of it do not consult the dispatch table (host time per call).
    lookups = []
    original = dispatch.choice
    dispatch.choice = lambda *args: lookups.append(args) or original(*args)
    try:
        compiled(history[:3], lengths[:3])
    finally:
        dispatch.choice = original
    assert [op for op, *_ in lookups if op == "retriever"] == []
    [row] = [row for row in kernels.dispatch_log() if row["op"] == "retriever"]
    assert row["algorithm"] == served_by
    with kernels.use("reference"):
        ref_ids, ref_scores = retriever(history[:3], lengths[:3])
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=0)
    torch._dynamo.reset()


def test_kernels_bench_times_our_variant_against_the_reference_columns_own_build():
    """As validate loads both from one checkpoint: where our spec's whole-call dispatch picks its reference
    twin, the twin is the reference column's build (two builds of one spec once timed 6-75% apart)."""
    from pipeline.bench import kernels_vs_reference as kvr

    torch._dynamo.reset()
    retriever = kvr.build(kvr.SMOKE, 50, 10, DEVICE, torch.float32)
    batch_inputs = {b: kvr.inputs(kvr.SMOKE, 50, b, DEVICE) for b in (1, 3)}
    with dispatch.timed_by(_timer({"reference": 1.0, "passes": 2.0, "gemv": 3.0, "triton": 2.0})):
        times = kvr.measure(retriever, "default", batch_inputs, DEVICE, warmup=1, iters=2, compiler="eager", rounds=1)
    assert times["triton"]["twin"] == "the reference build"
    assert {row["algorithm"] for row in kernels.dispatch_log() if row["op"] == "retriever"} == {"reference"}


def test_bench_script_smoke_reports_a_failing_shape_and_goes_on(tmp_path):
    """The GPU script in its reduced mode: a table with both kernels per shape and batch, the dispatch
    choices, a shape that cannot be built (5 items, top-10) reported, and no Hydra or MLflow imported."""
    code = ("import runpy, sys; sys.argv = ['kernels_vs_reference'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('pipeline.bench.kernels_vs_reference', run_name='__main__')\n"
            "except SystemExit as e:\n    code = e.code\n"
            "heavy = {'hydra', 'mlflow', 'omegaconf'} & set(sys.modules)\n"
            "assert not heavy, heavy\nsys.exit(code)\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", code, "--smoke", "--compiler", "eager", "--items", "5", "50",
                           "--out", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "kernels_vs_reference.csv")))
    assert sorted((r["items"], r["batch"]) for r in rows) == [("5", "1"), ("5", "3"), ("50", "1"), ("50", "3")]
    for r in rows:
        if r["items"] == "5":
            assert "k=10 must be between" in r["error"]
        else:
            assert not r["error"] and float(r["reference_p50_ms"]) > 0 and float(r["triton_p50_ms"]) > 0
    choices = list(csv.DictReader(open(tmp_path / "kernel_dispatch.csv")))
    assert {c["op"] for c in choices} == {"retriever", "retrieval", "hstu_attention", "ln_gate"}
    assert "Dispatch" in proc.stdout and "FAILED" in proc.stdout


def test_rounds_outvote_a_first_timings_one_off_cost():
    """The reference's first timing carries a one-off cost (as Inductor's CUDA graphs recording at a shape's
    second call): timed once it looks slower than ours; timed in rounds it is the faster, and it is chosen."""
    def timer(label, fn):
        fn()
        seen.append(label)
        return 3.0 if label == "reference" and seen.count("reference") == 1 else {"reference": 1.0}.get(label, 2.0)

    options = [dispatch.Option("triton", None, lambda: None)]
    reference = dispatch.Option(dispatch.REFERENCE, None, lambda: None)
    seen = []
    with dispatch.timed_by(timer):
        once = dispatch.choose("retriever", ("once",), torch.device("cpu"), reference, options)
    seen = []
    with dispatch.timed_by(timer):
        rounds = dispatch.choose("retriever", ("rounds",), torch.device("cpu"), reference, options, rounds=3)
    assert (once.algorithm, rounds.algorithm) == ("triton", dispatch.REFERENCE)
    assert seen.count("reference") == 3 and seen.count("triton") == 3
    assert (rounds.ms, rounds.reference_ms) == (1.0, 1.0)


def _options(ran: list[str]):
    def option(name, config=None):
        return dispatch.Option(name, config, lambda: ran.append(name))
    return option(dispatch.REFERENCE), [option("kernel", "cfg-a"), option("kernel", "cfg-b")]


def test_a_timed_choice_is_kept_on_disk_and_read_back_without_timing(tmp_path):
    """The compile stage tunes a shape once; validate and the serving engine, later processes on the same host,
    read the choice from the tuning cache instead of timing (an engine that tuned at load took 69 s on the H200)."""
    path = tmp_path / "tuning.json"
    ran: list[str] = []
    reference, options = _options(ran)
    with dispatch.tuning_cache(path), dispatch.timed_by(lambda label, fn: {"reference": 2.0, "kernel cfg-a": 3.0,
                                                                         "kernel cfg-b": 1.0}[label]):
        chosen = dispatch.choose("op", (4, "x"), DEVICE, reference, options)
    assert (chosen.algorithm, chosen.config, chosen.source) == ("kernel", "cfg-b", "timed")
    assert path.exists()

    dispatch.reset()  # a new process: nothing chosen in memory

    timed: list[str] = []
    with dispatch.tuning_cache(path), dispatch.timed_by(lambda label, fn: timed.append(label) or 1.0):
        again = dispatch.choose("op", (4, "x"), DEVICE, reference, options)
        assert (again.algorithm, again.config, again.source, again.ms) == ("kernel", "cfg-b", "cache", 1.0)
        assert timed == []
        dispatch.choose("op", (8, "x"), DEVICE, reference, options)  # another shape: not in the cache, timed
        assert timed == ["reference", "kernel cfg-a", "kernel cfg-b"]
    assert any(row["source"] == "cache" for row in dispatch.dispatch_log())


def test_the_tuning_cache_retunes_when_the_kept_option_is_gone_and_survives_a_corrupt_file(tmp_path):
    path = tmp_path / "tuning.json"
    ran: list[str] = []
    reference, options = _options(ran)
    with dispatch.tuning_cache(path), dispatch.timed_by(lambda label, fn: 1.0 if label == "kernel cfg-b" else 2.0):
        dispatch.choose("op", (1,), DEVICE, reference, options)
    dispatch.reset()
    renamed = [dispatch.Option("kernel", "cfg-c", lambda: None)]  # the kernel's configs changed since
    with dispatch.tuning_cache(path), dispatch.timed_by(lambda label, fn: 0.5 if label == "kernel cfg-c" else 2.0):
        chosen = dispatch.choose("op", (1,), DEVICE, reference, renamed)
    assert (chosen.config, chosen.source) == ("cfg-c", "timed")

    dispatch.reset()
    path.write_text("{not json")
    with dispatch.tuning_cache(path), dispatch.timed_by(lambda label, fn: 0.5 if label == "kernel cfg-a" else 2.0):
        chosen = dispatch.choose("op", (1,), DEVICE, reference, options)
    assert (chosen.config, chosen.source) == ("cfg-a", "timed")
    assert "cfg-a" in path.read_text()  # rewritten whole


def test_an_injected_timer_never_touches_the_default_tuning_cache(tmp_path, monkeypatch):
    """Tests' made-up timings must not become a host's kept choices."""
    monkeypatch.setenv("GENREC_TUNING_CACHE", str(tmp_path / "default.json"))
    monkeypatch.setattr(dispatch, "_store_resolved", False)
    ran: list[str] = []
    reference, options = _options(ran)
    with dispatch.timed_by(lambda label, fn: 0.1 if label == "kernel cfg-a" else 2.0):
        dispatch.choose("op", (2,), DEVICE, reference, options)
    assert not (tmp_path / "default.json").exists()
    assert dispatch.tuning_cache_path() == tmp_path / "default.json"


@pytest.mark.parametrize("kernel_ms,picked", [(0.98, dispatch.REFERENCE), (0.90, "kernel")])
def test_a_margin_keeps_the_reference_where_the_kernel_wins_by_noise(kernel_ms, picked, caplog):
    ran: list[str] = []
    reference, options = _options(ran)
    with dispatch.timed_by(lambda label, fn: 1.0 if label == "reference" else kernel_ms), \
            caplog.at_level("INFO", logger=dispatch.__name__):
        chosen = dispatch.choose("op", (kernel_ms,), DEVICE, reference, options[:1], margin=0.03)
    assert chosen.algorithm == picked
    # The log gives both sides of the verdict: the loser's time too, whichever side lost.
    loser = f"reference {1.0:.4f} ms" if picked == "kernel" else f"fastest other {options[0].label} {kernel_ms:.4f} ms"
    assert loser in caplog.text


def test_the_whole_call_is_timed_as_validate_and_the_bench_time_a_variant():
    """The twin-or-ours verdict's timer gives the per-call samples of calls timed as validate and the bench time
    a variant (pipeline.bench.latency.time_calls), not one block of launches: one slow call does not move it."""
    import time as time_module
    from pipeline.export.inductor import call_samples_ms
    sleeps = iter([0.0, 0.0] + [0.001] * 9 + [0.05])  # two warm-up calls, then one outlier in ten

    def call():
        time_module.sleep(next(sleeps))
    samples = call_samples_ms("x", call, torch.device("cpu"), iters=10)
    assert len(samples) == 10 and 0.9 <= float(np.median(samples)) < 3, samples  # per call, not the total
    assert next(sleeps, None) is None         # two warm-up calls and ten timed ones, no more


def test_an_option_fast_in_one_round_only_does_not_win_the_pooled_verdict():
    """As seen on the H200 under Inductor's CUDA graphs: ours timed 0.34 ms in its best block of calls against the
    reference's 0.36, then served at 0.53 against 0.31 ms. Each option's samples over the rounds are pooled and
    their median ranks it, so one lucky block does not pick an option that is slower in the rest."""
    blocks = {"reference": iter([np.full(20, 0.36), np.full(20, 0.31), np.full(20, 0.31)]),
              "triton": iter([np.full(20, 0.34), np.full(20, 0.53), np.full(20, 0.53)])}

    def timer(label, fn):
        return next(blocks[label])

    options = [dispatch.Option("triton", None, lambda: None)]
    reference = dispatch.Option(dispatch.REFERENCE, None, lambda: None)
    with dispatch.timed_by(timer):
        chosen = dispatch.choose("retriever", ("pooled",), torch.device("cpu"), reference, options, rounds=3)
    assert chosen.algorithm == dispatch.REFERENCE
    assert (chosen.ms, chosen.reference_ms) == (pytest.approx(0.31), pytest.approx(0.31))
    # Where ours is faster in most blocks it serves, by its pooled median.
    blocks = {"reference": iter([np.full(20, 0.36)] * 3), "triton": iter([np.full(20, 0.40)] + [np.full(20, 0.30)] * 2)}
    with dispatch.timed_by(timer):
        chosen = dispatch.choose("retriever", ("pooled-ours",), torch.device("cpu"), reference, options, rounds=3,
                                 margin=0.05)
    assert chosen.algorithm == "triton" and chosen.ms == pytest.approx(0.30)


def test_validate_sets_our_kernels_variant_beside_its_twin_and_flags_it_where_slower(caplog):
    """As in the H200 run on the ML-1M preset: inductor-max-autotune-triton-fp16 timed 0.528 ms at batch 1
    against its twin's 0.313 (and faster at 128): validate's table says so, and the run logs a warning."""
    from pipeline.catalogue import VariantSpec
    from pipeline.stages.validate import _twins_markdown, against_twins

    ours = VariantSpec("inductor", "fp16", "triton", "max-autotune").variant("ckpt", "compile")
    twin = VariantSpec("inductor", "fp16", "reference", "max-autotune").variant("ckpt", "compile")
    alone = VariantSpec("inductor", "fp16", "triton", "max-autotune-no-cudagraphs", cuda_graph=True).variant("ckpt", "compile")
    rows = [{"variant": ours.name, "latency_p50_ms_b1": 0.528, "latency_p50_ms_b128": 0.463},
            {"variant": twin.name, "latency_p50_ms_b1": 0.313, "latency_p50_ms_b128": 0.751},
            {"variant": alone.name, "latency_p50_ms_b1": 0.182, "latency_p50_ms_b128": 0.386}]
    with caplog.at_level("WARNING", logger="pipeline.stages.validate"):
        twins = against_twins([ours, twin, alone], rows, [1, 128])
    assert [(t["variant"], t["twin"]) for t in twins] == [(ours.name, twin.name)]  # the captured spec has no twin built
    assert twins[0]["ratios"] == {1: pytest.approx(0.313 / 0.528), 128: pytest.approx(0.751 / 0.463)}
    assert f"{ours.name} is slower than its twin {twin.name} at batch 1 " in caplog.text and "batch 128" not in caplog.text
    table = _twins_markdown(twins, [1, 128])
    assert f"| {ours.name} | {twin.name} | 0.59 (slower) | 1.62 |" in table
