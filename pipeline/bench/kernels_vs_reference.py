"""Our Triton kernels against the reference kernels in the same compiled spec, per catalogue size and batch.

    python -m pipeline.bench.kernels_vs_reference [--out DIR] [--budget-s 160] [--specs default+graph default]
    python -m pipeline.bench.kernels_vs_reference --smoke --compiler eager     # CPU, TRITON_INTERPRET=1

For the HSTU shapes of the synthetic default (conf/model/hstu.yaml: history 50, d=64, 2 layers, 2 heads)
and of the ML-1M preset (conf/tuned/hstu_ml-1m.yaml: history 200, 8 layers), item tables of 1k, 3.7k
(ML-1M), 100k and 1M items and batch 1 and 128: the p50 of the whole call as served (the compiled call, the
copy out and the exactness check), CUDA events, after warm-up, for kernels=reference and kernels=triton in
the same spec (CompiledRetriever: compile mode, plus "+graph" for the call captured in one CUDA graph);
our kernels' spec uses the reference spec's build as its twin, as validate does. Random-initialized models:
the shapes are the point. Prints a table, the ratio (reference p50 / ours: >= 1 means ours is not slower)
and the kernels' dispatch choice per op and shape, and writes both as CSV. A shape that fails is reported and
the run goes on; pairs not started within --budget-s are listed as skipped (run them with --shapes/--items).
Needs torch, triton and numpy only.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import kernels
from pipeline.bench.latency import summarize, time_calls
from pipeline.catalogue import DTYPES, FREEZING, VariantSpec
from pipeline.kernels import dispatch

ITEMS = (1_000, 3_706, 100_000, 1_000_000)
BATCHES = (1, 128)
TOP_K = 100  # conf/validate/default.yaml: top_k


@dataclass(frozen=True)
class Shape:
    """An HSTU retriever's shape and its users' history lengths (histories are padded to max_len)."""
    name: str
    max_len: int
    dim: int
    num_layers: int
    num_heads: int
    min_history: int
    items: int  # its dataset's catalogue


SHAPES = {
    # conf/model/hstu.yaml with conf/data/synthetic.yaml (histories of 10 to 60 actions, cut to 50)
    "synthetic": Shape("synthetic", 50, 64, 2, 2, 10, 1_000),
    # conf/tuned/hstu_ml-1m.yaml (ML-1M users have at least 20 ratings)
    "ml-1m": Shape("ml-1m", 200, 64, 8, 2, 20, 3_706),
}
SMOKE = Shape("smoke", 8, 16, 2, 2, 2, 50)
PRECISION_OF = {dtype: name for name, dtype in DTYPES.items()}


def spec_for(spec: str, kernel_backend: str, dtype: torch.dtype) -> VariantSpec:
    """The catalogue spec of a --specs entry ("<mode>[+graph]") with the given kernels: rows carry its name,
    the one validate and the registry use for the same build."""
    mode, _, graph = spec.partition("+")
    return VariantSpec("inductor", PRECISION_OF[dtype], kernel_backend, mode, cuda_graph=graph == "graph")


def build(shape: Shape, num_items: int, k: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from pipeline.models import HSTU, Retriever

    torch.manual_seed(seed)
    model = HSTU(num_items, shape.max_len, dim=shape.dim, num_layers=shape.num_layers, num_heads=shape.num_heads,
                 dropout=0.0, linear_dropout=0.0)
    return Retriever(model, k=k).to(device=device, dtype=dtype).eval().freeze()


def inputs(shape: Shape, num_items: int, batch: int, device: torch.device, seed: int = 0):
    """Right-padded random histories of min_history..max_len items."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min(shape.min_history, shape.max_len), shape.max_len + 1, (batch,), generator=gen)
    history = torch.randint(1, num_items + 1, (batch, shape.max_len), generator=gen)
    history[torch.arange(shape.max_len)[None, :] >= lengths[:, None]] = 0
    return history.to(device), lengths.to(device), None


def measure(retriever, spec: str, batch_inputs: dict[int, tuple], device: torch.device, warmup: int, iters: int,
            compiler: str, rounds: int = 5) -> dict[str, dict]:
    """Both kernel backends of one spec -> {backend: {batch: p50/p90/... of the served call, plus first_call_s
    (compile and tuning)}, or {"error": ...}}. Each is built and called once per batch first; then the two are
    timed in turns, `rounds` blocks of iters/rounds calls each, and each backend's samples pooled: a GPU's
    clocks and caches drift over a run, and timing one side wholly after the other carried that drift into
    the ratio (two builds of the same spec once measured 0.107 and 0.128 ms at b=128)."""
    from pipeline.export.inductor import CompiledRetriever, forget_shared_builds, shared_reference_build

    dtype = next(retriever.parameters()).dtype
    predictors, out = {}, {}
    # As validate builds them from one checkpoint: the reference spec once, and our kernels' variant using that
    # very build as its reference twin wherever its whole-call dispatch picks the twin (a second build of the
    # same spec once timed 6-75% apart from the first).
    source = ("kernels_vs_reference", id(retriever), dtype, str(device))
    for kernel_backend in ("reference", "triton"):
        variant = spec_for(spec, kernel_backend, dtype)
        try:
            if kernel_backend == "reference":
                predict = shared_reference_build(source, retriever, variant.mode, variant.cuda_graph,
                                                 FREEZING, compiler)
            else:
                predict = CompiledRetriever(retriever, variant.mode, variant.kernels, cuda_graph=variant.cuda_graph,
                                            compiler=compiler, source=source)
            out[kernel_backend] = {}
            for batch, args in batch_inputs.items():
                start = time.perf_counter()
                predict(*args)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                out[kernel_backend][batch] = {"first_call_s": time.perf_counter() - start}
            predictors[kernel_backend] = predict
        except Exception as err:  # noqa: BLE001 - reported, and the run goes on
            out[kernel_backend] = {"error": _error(err)}
            traceback.print_exc()
    per_round = max(1, iters // rounds)
    for batch, args in batch_inputs.items():
        samples: dict[str, list] = {kb: [] for kb in predictors}
        for r in range(rounds):
            for kernel_backend, predict in predictors.items():
                samples[kernel_backend].append(time_calls(lambda: predict(*args), device, warmup if r == 0 else 2,
                                                          per_round))
        for kernel_backend in predictors:
            out[kernel_backend][batch].update(summarize(np.concatenate(samples[kernel_backend]), batch))
    if "triton" in predictors:  # what its whole-call dispatch timed ours against
        twin = predictors["triton"].twin
        out["triton"]["twin"] = "none" if twin is None else \
            "the reference build" if twin is predictors.get("reference") else "a build of its own"
    forget_shared_builds(source)  # this pair's model goes when the pair is done
    torch._dynamo.reset()
    return out


def run(shapes: list[Shape], items: list[int], batches: list[int], specs: list[str], device: torch.device,
        dtype: torch.dtype, k: int, warmup: int, iters: int, budget_s: float, compiler: str) -> tuple[list, list]:
    """-> (rows: one per shape x items x spec x batch, dispatch rows). Failures are rows with an error."""
    rows, choices, start = [], [], time.perf_counter()
    for shape, num_items in order(shapes, items):
        base = {"shape": shape.name, "items": num_items}
        if time.perf_counter() - start > budget_s:
            new = [{**base, "spec": s, "batch": b, "error": "skipped: time budget spent"} for s in specs for b in batches]
        else:
            new = _pair(shape, num_items, batches, specs, device, dtype, k, warmup, iters, compiler, choices)
        for row in new:
            print(_line(row), flush=True)
        rows += new
    return rows, choices


def order(shapes: list[Shape], items: list[int]) -> list[tuple[Shape, int]]:
    """(shape, items) pairs, most telling first, so that a spent budget skips the least: each shape with its
    own dataset's catalogue, then with the largest, then the rest; the shapes taking turns."""
    per_shape = [sorted(items, key=lambda n: (n != shape.items, n != max(items), n)) for shape in shapes]
    return [(shape, ranked[i]) for i in range(len(items)) for shape, ranked in zip(shapes, per_shape)]


def _pair(shape: Shape, num_items: int, batches: list[int], specs: list[str], device: torch.device,
          dtype: torch.dtype, k: int, warmup: int, iters: int, compiler: str, choices: list) -> list[dict]:
    """Rows of one (shape, items) pair, both kernels in every spec; the dispatch's choices at this pair (per
    op and shape key, for calls launched op by op and for calls a CUDA graph replays) appended to `choices`."""
    base = {"shape": shape.name, "items": num_items}
    dispatch.reset()  # every pair lists (and times) its own choices
    try:
        retriever = build(shape, num_items, k, device, dtype)
        batch_inputs = {b: inputs(shape, num_items, b, device) for b in batches}
    except Exception as err:  # noqa: BLE001 - reported, and the run goes on
        return [{**base, "spec": s, "batch": b, "error": _error(err)} for s in specs for b in batches]
    rows = []
    for spec in specs:
        times = measure(retriever, spec, batch_inputs, device, warmup, iters, compiler)
        rows += [_row(base, spec_for(spec, "triton", dtype).name, b, times) for b in batches]
    choices += [{**base, **c} for c in kernels.dispatch_log()]
    del retriever
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _row(base: dict, spec: str, batch: int, times: dict[str, dict]) -> dict:
    row = {**base, "spec": spec, "batch": batch}
    errors = [f"{kb}: {t['error']}" for kb, t in times.items() if "error" in t]
    if errors:
        return {**row, "error": "; ".join(errors)}
    ref, ours = times["reference"][batch], times["triton"][batch]
    return {**row, "reference_p50_ms": ref["p50_ms"], "triton_p50_ms": ours["p50_ms"],
            "reference_p90_ms": ref["p90_ms"], "triton_p90_ms": ours["p90_ms"],
            "speedup": ref["p50_ms"] / ours["p50_ms"], "reference_first_call_s": ref["first_call_s"],
            "triton_first_call_s": ours["first_call_s"], "twin": times["triton"].get("twin", "none")}


def _error(err: Exception) -> str:
    return f"{type(err).__name__}: {err}".replace("\n", " ")[:500]


def _line(row: dict) -> str:
    head = f"{row['shape']:>9} {row['items']:>9} {row['spec']:>28} b={row['batch']:<4}"
    if "error" in row:
        return f"{head} FAILED {row['error']}"
    flag = "" if row["speedup"] >= 0.95 else "   <-- ours slower"
    return (f"{head} reference {row['reference_p50_ms']:8.3f} ms  triton {row['triton_p50_ms']:8.3f} ms  "
            f"ratio {row['speedup']:5.2f}{flag}")


def table(rows: list[dict], choices: list[dict]) -> str:
    lines = ["| shape | items | spec | batch | reference p50 ms | triton p50 ms | reference/triton | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['items']} | {r['spec']} | {r['batch']} | | | | {r['error'][:200]} |")
        else:
            lines.append(f"| {r['shape']} | {r['items']} | {r['spec']} | {r['batch']} | {r['reference_p50_ms']:.3f} | "
                         f"{r['triton_p50_ms']:.3f} | {r['speedup']:.2f} | |")
    lines += ["", "Dispatch (kernels=triton): what runs per op and shape key (batch bucket first), for calls launched",
              "op by op and for calls a CUDA graph replays, and the timings (nan: untimed)",
              "", "| shape | items | op | key | served by graph | runs | config | ms | reference ms |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in choices:
        lines.append(f"| {c['shape']} | {c['items']} | {c['op']} | {c['key']} | {c['graphed']} | "
                     f"{c['algorithm']} | {c['config']} | {c['ms']:.4f} | {c['reference_ms']:.4f} |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--items", nargs="+", type=int, default=list(ITEMS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--specs", nargs="+", default=["default+graph", "default"],
                        help="compile mode, +graph for the call captured in one CUDA graph (e.g. max-autotune, "
                             "max-autotune-no-cudagraphs+graph)")
    parser.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    parser.add_argument("--top-k", type=int, default=TOP_K)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--budget-s", type=float, default=160.0,
                        help="no new (shape, items) pair starts after this many seconds (one pair takes about a "
                             "minute at most, its compiles included)")
    parser.add_argument("--tune-budget-s", type=float, default=10.0,
                        help="seconds the kernels' tuner may spend per op and shape (GENREC_TUNE_BUDGET_S)")
    parser.add_argument("--compiler", default="inductor", help="torch.compile backend (eager: quick CPU checks)")
    parser.add_argument("--out", type=Path, default=Path("kernels_vs_reference"))
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on whatever device there is (CPU: TRITON_INTERPRET=1), to check the script")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not kernels.triton_runs_on(device):
        print("Triton kernels need a CUDA device (or TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    os.environ.setdefault("GENREC_TUNE_BUDGET_S", str(args.tune_budget_s))
    shapes = [SHAPES[name] for name in args.shapes]
    dtype = DTYPES[args.dtype]
    if args.smoke:
        shapes, dtype = [SMOKE], torch.float32  # the interpreter's 16-bit dots are not the GPU's
        items = [n for n in args.items if n < 1000] or [40, 90]
        args.batches, args.dtype = [1, 3], "fp32"
        args.top_k, args.warmup, args.iters, args.specs = min(args.top_k, 10), 1, 3, args.specs[:1]
    else:
        items = args.items
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    rows, choices = run(shapes, items, args.batches, args.specs, device, dtype, args.top_k, args.warmup,
                        args.iters, args.budget_s, args.compiler)
    args.out.mkdir(parents=True, exist_ok=True)
    _write_csv(args.out / "kernels_vs_reference.csv", rows)
    if choices:
        _write_csv(args.out / "kernel_dispatch.csv", choices)
    text = table(rows, choices)
    (args.out / "kernels_vs_reference.md").write_text(text)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{name}, torch {torch.__version__}, {args.dtype}, top-{args.top_k}, p50 of {args.iters} calls\n")
    print(text, flush=True)
    return 0 if any("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
