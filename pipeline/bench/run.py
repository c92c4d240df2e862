"""make bench: catalogue variants (pipeline/catalogue.py) on a standard workload, the plain-PyTorch
baselines included, measured the same way in one run; roofline from bandwidth and matmul peak measured in
the same run; a CSV, a latency-vs-batch PNG, a compact table, and (optionally) MLflow. A name here is the
build of that name in the pipeline's validate table: the same spec, built by the same catalogue.build.

    python -m pipeline.bench.run                                       # retrieval-cpu on the CPU
    python -m pipeline.bench.run bench.workload=retrieval-1m --out DIR # the standard GPU workload
    python -m pipeline.bench.run --variants eager-fp32 inductor-fp32 bench.iters=50
    python -m pipeline.bench.run --parts --gpu-tests ...               # halves of the call; GPU kernel tests first
    python -m pipeline.bench.run bench.workload=incremental-1m         # the user-state cache (pipeline.bench.incremental)

Settings come from the pipeline's Hydra config (conf/bench/default.yaml): `key=value` arguments override it.
A variant that fails is reported and the run goes on; variants left when bench.budget_s runs out are skipped.
"""
from __future__ import annotations

import argparse
import csv
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from pipeline import PROJECT_ROOT, kernels
from pipeline.bench.latency import summarize, time_calls
from pipeline.bench.roofline import copy_bandwidth, limit_seconds, matmul_peak
from pipeline.bench.workload import WORKLOADS, Workload
from pipeline.catalogue import DTYPES, FREEZING, VariantSpec, build
from pipeline.core import PipelineError

COLUMNS = ("variant", "batch_size", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "users_per_s", "limit_ms",
           "roofline_fraction", "topk_overlap", "first_call_s")
PARTS = ("encoder", "retrieval")


@dataclass(frozen=True)
class Part:
    """One half of a variant's call alone (not a variant: nothing the pipeline builds), to see where time goes."""

    part: str            # encoder | retrieval
    spec: VariantSpec

    @property
    def name(self) -> str:
        return f"part-{self.part}:{self.spec.name}"


def _build_part(part: Part, workload: Workload, device: torch.device) -> Callable:
    spec = part.spec
    retriever = workload.retriever(device, DTYPES[spec.precision]).freeze(int8_table=spec.int8_table)
    if part.part == "encoder":
        return _compiled(retriever.query, spec.mode, spec.kernels)
    return _retrieval_only(retriever, workload, device, spec.kernels)


def _build(item: VariantSpec | Part, workload: Workload, device: torch.device) -> Callable:
    if isinstance(item, Part):
        return _build_part(item, workload, device)
    return build(item, workload.retriever(device, DTYPES[item.precision]), device)


def _compiled(fn: Callable, mode: str | None, kernel_backend: str) -> Callable:
    if mode:
        fn = torch.compile(fn, options={**torch._inductor.list_mode_options(mode), "freezing": FREEZING})

    @torch.no_grad()
    def call(history, lengths):
        if history.shape[0] > 1:
            torch._dynamo.mark_dynamic(history, 0)
            torch._dynamo.mark_dynamic(lengths, 0)
        with kernels.use(kernel_backend):
            return (fn(history, lengths),)
    return call


def _retrieval_only(retriever, workload: Workload, device: torch.device, kernel_backend: str) -> Callable:
    """The top-K over the table for fixed unit queries, without the encoder."""
    queries: dict[int, torch.Tensor] = {}
    dtype = next(retriever.parameters()).dtype
    table, scales = retriever.table(dtype), retriever.table_scales

    @torch.no_grad()
    def call(history, lengths):
        b = history.shape[0]
        if b not in queries:
            gen = torch.Generator(device="cpu").manual_seed(b)
            queries[b] = torch.nn.functional.normalize(torch.randn(b, workload.dim, generator=gen), dim=-1).to(device, dtype)
        with kernels.use(kernel_backend):
            scores, ids = kernels.retrieval_top_k(queries[b], table, history, workload.top_k, scales)
        return (ids,)
    return call


def bench_specs(bcfg, device: torch.device) -> list[VariantSpec]:
    """bench.variants.<device type>: the catalogue specs this device times by default."""
    return [_timeable(VariantSpec.from_entry(entry)) for entry in bcfg.variants[device.type]]


def _timeable(spec: VariantSpec) -> VariantSpec:
    if spec.backend not in ("eager", "inductor"):
        raise PipelineError(f"{spec.name}: the bench builds eager and inductor variants from its workload; a "
                            f"{spec.backend} variant is measured by the pipeline's validate stage")
    return spec


def bench_parts(bcfg, device: torch.device) -> list[Part]:
    parts = []
    for entry in bcfg.parts[device.type]:
        if entry.get("part") not in PARTS:
            raise PipelineError(f"bench.parts entry {dict(entry)}: part must be one of {', '.join(PARTS)}")
        parts.append(Part(entry["part"], VariantSpec.from_entry(entry["variant"])))
    return parts


def chosen_specs(names: list[str] | None, defaults: list[VariantSpec]) -> list[VariantSpec]:
    """--variants: any catalogue name (a bad one is refused naming the defaults); none: the defaults."""
    if names is None:
        return defaults
    specs = []
    for name in names:
        try:
            specs.append(_timeable(VariantSpec.parse(name)))
        except PipelineError as err:
            raise PipelineError(f"{err}; the defaults on this device: {', '.join(s.name for s in defaults)}") from None
    return specs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. bench.workload=retrieval-1m bench.iters=50")
    parser.add_argument("--out", type=Path, default=None, help="default: <artifacts_dir>/bench/<UTC time>")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="catalogue names to run (default: bench.variants for the device)")
    parser.add_argument("--parts", action="store_true",
                        help="also time halves of the call (bench.parts: encoder alone, retrieval alone)")
    parser.add_argument("--gpu-tests", action="store_true", help="run the gpu-marked kernel tests first")
    parser.add_argument("--profile", action="store_true",
                        help="also write profile.txt: the top kernels by GPU time per variant at the smallest and largest batch")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        cfg = _config(args.overrides)
        bcfg = cfg.bench
        if bcfg.workload is not None and str(bcfg.workload).startswith("incremental"):
            # Incremental inference (docs/INCREMENTAL.md) times cache paths, not catalogue variants.
            from pipeline.bench import incremental

            return incremental.main([*args.overrides, *(["--out", str(args.out)] if args.out else [])])
        if bcfg.workload is not None and bcfg.workload not in WORKLOADS:
            raise PipelineError(f"unknown bench.workload '{bcfg.workload}'; valid choices: {', '.join(sorted(WORKLOADS))}")
        chosen: list[VariantSpec | Part] = [*chosen_specs(args.variants, bench_specs(bcfg, device)),
                                            *(bench_parts(bcfg, device) if args.parts else [])]
    except PipelineError as err:
        parser.error(str(err))
    if args.gpu_tests:
        _gpu_tests()
    return _run(cfg, chosen, args, device, argv)


def _config(overrides: list[str]):
    """The pipeline's Hydra config with the bench group: `key=value` arguments override it."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.serving.config import load_config

    try:
        return load_config(["+bench=default", *overrides])
    except (HydraException, OmegaConfBaseException) as err:
        raise PipelineError(f"bad config override: {err}") from None


def _run(cfg, chosen: list, args: argparse.Namespace, device: torch.device, argv: list[str] | None) -> int:
    start = time.perf_counter()
    bcfg = cfg.bench
    workload = WORKLOADS[bcfg.workload or ("retrieval-1m" if device.type == "cuda" else "retrieval-cpu")]
    batch_sizes = list(bcfg.batch_sizes or workload.batch_sizes)
    warmup = bcfg.warmup if bcfg.warmup is not None else 10 if device.type == "cuda" else 3
    iters = bcfg.iters or (100 if device.type == "cuda" else 20)
    out = args.out or Path(cfg.artifacts_dir) / "bench" / datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu":
        torch.set_num_threads(bcfg.num_threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    name = _device_name(device)

    bandwidth = copy_bandwidth(device)
    peak, peak_dtype = matmul_peak(device)
    print(f"# {workload.name} on {name}, torch {torch.__version__}: copy {bandwidth / 1e9:.0f} GB/s, "
          f"{peak_dtype} matmul {peak / 1e12:.3g} TFLOP/s", flush=True)

    rows, failures, reference = [], {}, {}
    overlap_batch = next((b for b in batch_sizes if b > 1), batch_sizes[0])
    for variant in chosen:
        if time.perf_counter() - start > bcfg.budget_s:
            failures[variant.name] = f"skipped: bench.budget_s {bcfg.budget_s:.0f} s spent"
            print(f"{variant.name}: {failures[variant.name]}", flush=True)
            continue
        spec = variant.spec if isinstance(variant, Part) else variant
        try:
            predict = _build(variant, workload, device)
            # Batch 1 first, then the largest: a dynamic-batch graph is compiled (and max-autotune picks its
            # matmul templates) for the first size above 1 it sees, and the largest batch is the throughput
            # row (on the H200 the same graph took 9.6 ms at b=1024 compiled at b=16, 7.6 compiled at 1024).
            for b in sorted(batch_sizes, key=lambda size: (size > 1, -size)):
                if time.perf_counter() - start > bcfg.budget_s + bcfg.grace_s:
                    raise TimeoutError(f"bench.budget_s {bcfg.budget_s:.0f} s + bench.grace_s {bcfg.grace_s:.0f} s "
                                       f"spent before b={b}")
                history, lengths = workload.inputs(b, device)
                t0 = time.perf_counter()
                # CUDA-graph variants reuse their output buffers: mark a new step and copy what we keep.
                if hasattr(torch.compiler, "cudagraph_mark_step_begin"):
                    torch.compiler.cudagraph_mark_step_begin()
                ids = predict(history, lengths)[0].clone()
                _sync(device)
                first_call = time.perf_counter() - t0
                samples = time_calls(lambda: predict(history, lengths), device, warmup, iters)
                row = {"variant": variant.name, **summarize(samples, b), "first_call_s": first_call}
                table_bytes = workload.table_bytes(torch.int8 if spec.int8_table else DTYPES[spec.precision])
                limit = limit_seconds(table_bytes, workload.flops(b), bandwidth, peak)
                row["limit_ms"] = limit * 1e3
                row["roofline_fraction"] = row["limit_ms"] / row["p50_ms"]
                if b == overlap_batch and not isinstance(variant, Part):
                    reference.setdefault("ids", ids.cpu())
                    row["topk_overlap"] = _overlap(ids.cpu(), reference["ids"])
                rows.append(row)
                if args.profile and b in (min(batch_sizes), max(batch_sizes)):
                    _profile(lambda: predict(history, lengths), device, f"{variant.name} b={b}", out / "profile.txt")
                print(f"{variant.name:34s} b={b:<5d} p50 {row['p50_ms']:8.3f} ms  p99 {row['p99_ms']:8.3f} ms  "
                      f"{row['users_per_s']:10.0f} users/s  roofline {row['roofline_fraction']:.2f}  "
                      f"first call {first_call:.1f} s", flush=True)
        except Exception as err:  # one broken variant must not cost the others their numbers
            failures[variant.name] = f"{type(err).__name__}: {err}"[:2000]
            print(f"{variant.name}: FAILED {failures[variant.name]}", flush=True)
            traceback.print_exc()
        finally:
            predict = None
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # After every variant, so that a run killed from outside still leaves its numbers.
            _write_csv(out / "bench.csv", rows)
            _tuning_table(out / "kernel_tuning.csv")

    csv_path = _write_csv(out / "bench.csv", rows)
    plot = _plot(rows, out / "latency_vs_batch.png", f"{workload.name} on {name}")
    facts = {"workload": workload.name, "device_name": name, "torch": torch.__version__,
             "copy_gb_s": bandwidth / 1e9, "matmul_tflop_s": peak / 1e12, "matmul_dtype": peak_dtype,
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "command": " ".join([Path(sys.executable).name, "-m", "pipeline.bench.run", *(argv or sys.argv[1:])])}
    table = _table(rows, batch_sizes, chosen, facts, failures)
    tuning = _tuning_table(out / "kernel_tuning.csv")
    (out / "bench.md").write_text(table + tuning)
    print("\n" + table, flush=True)
    if not args.no_mlflow:
        _log_mlflow(cfg, rows, facts, failures, [csv_path, out / "bench.md", *([plot] if plot else [])], device)
    return 0 if rows else 1


def _tuning_table(path: Path) -> str:
    """What the fused top-K's tuner timed on this device (if it ran): per shape, every candidate's ms."""
    module = sys.modules.get("pipeline.kernels.triton_retrieval")
    log = getattr(module, "TUNING_LOG", [])
    if not log:
        return ""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["batch_bucket", "items", "dim", "table_dtype", "k", "block_b", "block_n", "tiles_per_chunk",
                         "num_warps", "num_stages", "block_d", "keep", "merge", "algorithm", "ms"])
        for key, cfg, ms in log:
            writer.writerow([key[0], key[1], key[2], str(key[4]).replace("torch.", ""), key[5], cfg.block_b,
                             cfg.block_n, cfg.tiles_per_chunk, cfg.num_warps, cfg.num_stages, cfg.block_d, cfg.keep,
                             cfg.merge, cfg.algorithm, f"{ms:.4f}"])
    lines = ["", "Fused top-K tuning (ms per call of the candidates step, best first per shape):"]
    shapes = dict.fromkeys((key[0], str(key[4])) for key, _, _ in log)
    for bucket, table_dtype in shapes:
        entries = sorted(((ms, cfg) for key, cfg, ms in log if (key[0], str(key[4])) == (bucket, table_dtype)),
                         key=lambda entry: (entry[0] != entry[0], entry[0]))  # failed (nan) last
        lines.append(f"- b<={bucket} {table_dtype}: " + ", ".join(
            f"{ms:.3f} (B{c.block_b} N{c.block_n} T{c.tiles_per_chunk} w{c.num_warps} s{c.num_stages} "
            f"D{c.block_d} K{c.keep} {c.merge} {c.algorithm})"
            for ms, c in entries))
    return "\n".join(lines) + "\n"


def _profile(call: Callable, device: torch.device, title: str, path: Path, calls: int = 5) -> None:
    """Append the kernels that take the most time over `calls` calls (torch.profiler) to path."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            if hasattr(torch.compiler, "cudagraph_mark_step_begin"):
                torch.compiler.cudagraph_mark_step_begin()
            call()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=90)
    except Exception:  # newer torch names the column after the device
        table = prof.key_averages().table(sort_by=key.replace("cuda", "device"), row_limit=25, max_name_column_width=90)
    with open(path, "a") as f:
        f.write(f"\n## {title} ({calls} calls)\n{table}\n")


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    # Not pipeline.tracking's: that needs omegaconf, which a bare GPU host may lack.
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()


def _overlap(ids: torch.Tensor, ref: torch.Tensor) -> float:
    return (ids[:, :, None] == ref[:, None, :]).any(dim=2).float().mean().item()


def _gpu_tests() -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_kernels.py",
           "tests/test_aoti_gpu.py"]
    print("# " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True)
    print(proc.stdout[-4000:] + proc.stderr[-2000:], flush=True)


def _plot(rows: list[dict], path: Path, title: str) -> Path | None:
    try:
        from pipeline.bench.plots import latency_vs_batch

        return latency_vs_batch(rows, path, title) if rows else None
    except ImportError as err:
        print(f"no plot: {err}", flush=True)
        return None


def _table(rows, batch_sizes, variants, facts, failures) -> str:
    """p50 per batch size, users/s and roofline fraction at the largest batch, the best baseline marked."""
    big, small = max(batch_sizes), min(batch_sizes)
    baseline = {v.name for v in variants if isinstance(v, VariantSpec) and v.baseline}
    parts = {v.name for v in variants if isinstance(v, Part)}
    lines = [f"{facts['workload']} on {facts['device_name']}, torch {facts['torch']}, {facts['date']}; "
             f"copy {facts['copy_gb_s']:.0f} GB/s, {facts['matmul_dtype']} matmul {facts['matmul_tflop_s']:.3g} TFLOP/s",
             f"command: {facts['command']}", "",
             "| variant | " + " | ".join(f"p50 b={b} ms" for b in batch_sizes)
             + f" | users/s b={big} | roofline b={small} | roofline b={big} | top-K overlap |",
             "|" + " --- |" * (len(batch_sizes) + 5)]
    by = {(r["variant"], r["batch_size"]): r for r in rows}
    for name in dict.fromkeys(r["variant"] for r in rows):
        cells = [f"{by[(name, b)]['p50_ms']:.3f}" if (name, b) in by else "-" for b in batch_sizes]
        last, first = by.get((name, big)), by.get((name, small))
        overlap = next((r["topk_overlap"] for r in rows if r["variant"] == name and "topk_overlap" in r), None)
        tag = " (baseline)" if name in baseline else " (part)" if name in parts else ""
        lines.append(f"| {name}{tag} | " + " | ".join(cells)
                     + (f" | {last['users_per_s']:.0f}" if last else " | -")
                     + (f" | {first['roofline_fraction']:.2f}" if first else " | -")
                     + (f" | {last['roofline_fraction']:.2f}" if last else " | -")
                     + (f" | {overlap:.4f} |" if overlap is not None else " | - |"))
    for name, why in failures.items():
        lines.append(f"\n{name}: {why.splitlines()[0][:300]}")
    best = lambda b, names: min((by[(n, b)]["p50_ms"] for n in names if (n, b) in by), default=None)  # noqa: E731
    ours = {r["variant"] for r in rows} - baseline - parts
    for b in (small, big):
        mine, theirs = best(b, ours), best(b, baseline)
        if mine and theirs:
            lines.append(f"\nb={b}: best of ours {mine:.3f} ms, best baseline {theirs:.3f} ms: {theirs / mine:.2f}x")
    return "\n".join(lines) + "\n"


def _log_mlflow(cfg, rows, facts, failures, artifacts, device) -> None:
    try:
        from omegaconf import OmegaConf

        from pipeline.tracking import Tracker, host_tags

        tracker = Tracker(OmegaConf.create({"tracking_uri": cfg.mlflow.tracking_uri,
                                            "experiment_name": cfg.bench.experiment_name}), Path(cfg.artifacts_dir))
        with tracker.run(f"bench:{facts['workload']}", tags={**host_tags(device), "workload": facts["workload"]},
                         nested=False):
            tracker.log_params({k: v for k, v in facts.items() if k != "date"})
            tracker.log_metrics({"copy_gb_s": facts["copy_gb_s"], "matmul_tflop_s": facts["matmul_tflop_s"]})
            for name in dict.fromkeys(r["variant"] for r in rows):
                with tracker.run(f"variant:{name}", tags={"variant": name, "workload": facts["workload"]}):
                    metrics = {}
                    for r in (r for r in rows if r["variant"] == name):
                        b = int(r["batch_size"])
                        metrics.update({f"latency_{q}_ms_b{b}": r[f"{q}_ms"] for q in ("p50", "p90", "p99")})
                        metrics[f"users_per_s_b{b}"] = r["users_per_s"]
                        metrics[f"roofline_fraction_b{b}"] = r["roofline_fraction"]
                        if "topk_overlap" in r:
                            metrics["parity_topk_overlap"] = r["topk_overlap"]
                    tracker.log_metrics(metrics)
            if failures:
                tracker.set_tags({"failed_variants": "; ".join(f"{n}: {w}" for n, w in failures.items())[:5000]})
            for path in artifacts:
                tracker.log_artifact(path)
        print(f"logged to MLflow at {tracker.uri}", flush=True)
    except Exception as err:
        print(f"MLflow logging failed (use --no-mlflow to skip it): {type(err).__name__}: {err}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
