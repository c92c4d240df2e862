"""Incremental inference against full recompute (docs/INCREMENTAL.md), one workload per run:

    python -m pipeline.bench.incremental                        # incremental-1m on a GPU, incremental-cpu on the CPU
    python -m pipeline.bench.incremental --smoke                # a tiny shape, seconds on a CPU (does it run?)
    python -m pipeline.bench.incremental bench.iters=50 --out DIR --kernels triton
    make bench ARGS="bench.workload=incremental-1m"             # the same through make bench

For each history length of the workload (1,000 and 200 for incremental-1m) and each number of appended
actions (1 and 5): a user's cached state covers history - appended actions, and the request sends the whole
history. Timed per path, at batch 1 (latency) and the workload's largest batch (throughput):
- full: the retriever as served today (encode the whole history, top-K);
- device_hit / host_hit: IncrementalRetriever.recommend with every row's prefix in the device / host tier;
- miss: the same with an empty cache (encode the whole history, seed the cache, top-K);
- encoder:full and encoder:device_hit: the query alone, without the top-K (the encoder's share; a device
  hit's includes the cache's lookups and write-back);
- on CUDA, device_hit:eager and encoder:device_hit:eager: the same without CUDA graphs (the encoder's
  kernels launched one by one), to show what the graphs save.
Each timed call starts from the same cache contents (re-seeded before it, untimed), so a hit stays a hit.
Reports p50/p99, users/s, each path's speed-up over full recompute, and the bytes one cached user costs.
Settings (warm-up, iterations, CPU threads) come from the bench config group (conf/bench/default.yaml).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline import kernels
from pipeline.bench.latency import summarize
from pipeline.catalogue import DTYPES
from pipeline.core import PipelineError
from pipeline.models import HSTU, Retriever
from pipeline.serving.kvcache import DEVICE_TIER, HOST_TIER, IncrementalRetriever, KVCache


@dataclass(frozen=True)
class IncrementalWorkload:
    name: str
    num_items: int
    histories: tuple[int, ...]   # history lengths; the model's max_len is each one
    dim: int
    num_layers: int
    num_heads: int
    top_k: int
    batch_sizes: tuple[int, ...]
    appends: tuple[int, ...]     # new actions per request on top of the cached prefix

    def retriever(self, max_len: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Retriever:
        torch.manual_seed(seed)
        model = HSTU(self.num_items, max_len, dim=self.dim, num_layers=self.num_layers, num_heads=self.num_heads,
                     dropout=0.0, linear_dropout=0.0)
        return Retriever(model, k=self.top_k).to(device=device, dtype=dtype).eval()


WORKLOADS = {
    # Issue 19's measurement: the standard retrieval-1m model at histories 1,000 and 200.
    "incremental-1m": IncrementalWorkload("incremental-1m", 1_000_000, (1000, 200), 256, 4, 4, 100, (1, 128), (1, 5)),
    # The same at a size a 2-core CPU measures in a few minutes.
    "incremental-cpu": IncrementalWorkload("incremental-cpu", 50_000, (200, 50), 64, 2, 2, 100, (1, 16), (1, 5)),
    # --smoke: does every path run (seconds).
    "incremental-smoke": IncrementalWorkload("incremental-smoke", 500, (24, 12), 16, 2, 2, 10, (1, 4), (1, 5)),
}
COLUMNS = ("history", "appended", "path", "batch_size", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "users_per_s",
           "speedup_vs_full", "bytes_per_user")
PATHS = ("full", "device_hit", "host_hit", "miss", "encoder:full", "encoder:device_hit")
EAGER_PATHS = ("device_hit:eager", "encoder:device_hit:eager")  # CUDA only: without the encoder's CUDA graphs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_with_setup(fn: Callable[[], object], setup: Callable[[], object], device: torch.device, warmup: int,
                    iters: int) -> np.ndarray:
    """ms per call of fn, setup() run (untimed) before each call: CUDA events around fn on a GPU."""
    for _ in range(warmup):
        setup()
        fn()
    samples = np.empty(iters)
    for i in range(iters):
        setup()
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples[i] = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            samples[i] = (time.perf_counter() - t0) * 1e3
    return samples


def profile_call(fn: Callable[[], object], setup: Callable[[], object], device: torch.device, path: Path) -> None:
    """One call of fn under torch.profiler (after setup): where its time goes, per op, host and device."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    setup()
    _sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        wall = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                         "cudaLaunchKernelExC"))
    device_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(f"wall {wall:.3f} ms under the profiler; kernel launches {launches}\n\n")
        f.write(events.table(sort_by=device_key, row_limit=30) + "\n\n")
        f.write(events.table(sort_by="cpu_time_total", row_limit=30) + "\n")


def run_workload(workload: IncrementalWorkload, device: torch.device, dtype: torch.dtype, warmup: int, iters: int,
                 log: Callable[[str], None] = print, profile_dir: Path | None = None) -> list[dict]:
    rows = []
    for hist in workload.histories:
        retriever = workload.retriever(hist, device, dtype).freeze()
        engine = IncrementalRetriever(retriever, None)
        per_user = engine.bytes_per_user(hist)
        for batch in workload.batch_sizes:
            gen = torch.Generator().manual_seed(batch)
            history = torch.randint(1, workload.num_items + 1, (batch, hist), generator=gen).to(device)
            lengths = torch.full((batch,), hist, device=device)
            users = list(range(batch))
            history_host = history.cpu().numpy()
            # The cached paths take the request as the server has it, on the host (pinned with CUDA): the cache
            # plans on the host, and a device history would cost it a copy back. Full recompute takes it on
            # the device, which spares it the copy there (in its favour).
            pin = device.type == "cuda"
            history_in = history.cpu().pin_memory() if pin else history.cpu()
            lengths_in = lengths.cpu().pin_memory() if pin else lengths.cpu()
            with torch.no_grad():
                full_ids, _ = retriever(history, lengths)
            calls: dict[str, tuple[Callable, Callable]] = {
                "full": (lambda: retriever(history, lengths), lambda: None),
                "encoder:full": (lambda: retriever.query(history, lengths), lambda: None),
            }
            base: dict[str, float] = {}
            for appended in workload.appends:
                prefix = hist - appended
                _, states = engine.encoder.encode([None] * batch, [history[b, :prefix] for b in range(batch)])
                measured = states[0].nbytes
                # The host tier's copies, pinned once (with CUDA): seeding it before each call is then a dict insert.
                pinned = [s.to(torch.device("cpu"), pin=torch.cuda.is_available()) for s in states]
                del states
                device_cache = KVCache(per_user * batch * 2, per_user * batch * 2, device)
                host_cache = KVCache(per_user * batch * 2, per_user * batch * 2, device)
                miss_cache = KVCache(per_user * batch * 2, 0, device)
                eager_cache = KVCache(per_user * batch * 2, 0, device) if device.type == "cuda" else None
                hit = IncrementalRetriever(retriever, device_cache)
                eager = IncrementalRetriever(retriever, eager_cache, cuda_graphs=False) if eager_cache else None
                host = IncrementalRetriever(retriever, host_cache)
                miss = IncrementalRetriever(retriever, miss_cache)

                def seed(cache: KVCache, tier: str = DEVICE_TIER) -> None:
                    """Every row's user with its prefix in `tier` (the device tier: copied into the pool's pages)."""
                    cache.clear()
                    for b, state in enumerate(pinned):
                        cache.put_state(b, state, history_host[b, :prefix], None, engine.namespace, tier)

                calls.update({
                    "device_hit": (lambda: hit.recommend(history_in, lengths_in, users), lambda: seed(device_cache)),
                    "host_hit": (lambda: host.recommend(history_in, lengths_in, users), lambda: seed(host_cache, HOST_TIER)),
                    "miss": (lambda: miss.recommend(history_in, lengths_in, users), miss_cache.clear),
                    "encoder:device_hit": (lambda: hit.queries(history_in, lengths_in, users), lambda: seed(device_cache)),
                })
                if eager is not None:
                    calls.update({
                        "device_hit:eager": (lambda: eager.recommend(history_in, lengths_in, users),
                                             lambda: seed(eager_cache)),
                        "encoder:device_hit:eager": (lambda: eager.queries(history_in, lengths_in, users),
                                                     lambda: seed(eager_cache)),
                    })
                # Every cached path must answer what full recompute answers (the point of the cache).
                for name, cache, tier in (("device_hit", device_cache, DEVICE_TIER), ("host_hit", host_cache, HOST_TIER)):
                    seed(cache, tier)
                    ids, _, paths = (hit if name == "device_hit" else host).recommend_detailed(history_in, lengths_in, users)
                    if set(paths) != {name}:
                        raise PipelineError(f"{name} setup served paths {sorted(set(paths))}")
                    overlap = (ids.cpu()[:, :, None] == full_ids.cpu()[:, None, :]).any(-1).float().mean().item()
                    log(f"  history {hist} +{appended} b={batch} {name}: top-K overlap with full recompute {overlap:.4f}")
                for path in PATHS + (EAGER_PATHS if eager is not None else ()):
                    if path in base and path in ("full", "encoder:full"):
                        continue  # the same call for every number of appended actions
                    fn, setup = calls[path]
                    with torch.no_grad():
                        samples = time_with_setup(fn, setup, device, warmup, iters)
                    row = {"history": hist, "appended": appended if not path.endswith("full") else 0, "path": path,
                           **summarize(samples, batch), "bytes_per_user": measured}
                    if profile_dir is not None and hist == workload.histories[0] and appended == workload.appends[0] \
                            and batch == max(workload.batch_sizes):
                        with torch.no_grad():
                            profile_call(fn, setup, device, profile_dir / f"profile-{path.replace(':', '-')}.txt")
                    if path in ("full", "encoder:full"):
                        base[path] = row["p50_ms"]
                    reference = base["encoder:full" if path.startswith("encoder") else "full"]
                    row["speedup_vs_full"] = reference / row["p50_ms"]
                    rows.append(row)
                    log(f"history {hist:5d} +{row['appended']} b={batch:<4d} {path:20s} p50 {row['p50_ms']:9.3f} ms "
                        f"p99 {row['p99_ms']:9.3f} ms {row['users_per_s']:10.0f} users/s "
                        f"x{row['speedup_vs_full']:.2f} vs full")
                del pinned, device_cache, host_cache, miss_cache, eager_cache
    return rows


def table(rows: list[dict], facts: dict) -> str:
    """Markdown: per history, appended actions and batch, each path's p50 and its ratio to full recompute."""
    lines = [f"{facts['workload']} on {facts['device']}, {facts['dtype']}, kernels {facts['kernels']}, torch "
             f"{facts['torch']}, {facts['date']}", f"command: {facts['command']}", "",
             "| history | appended | batch | path | p50 ms | p99 ms | users/s | speed-up vs full |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['history']} | {r['appended'] or '-'} | {r['batch_size']} | {r['path']} | "
                     f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['users_per_s']:.0f} | {r['speedup_vs_full']:.2f}x |")
    lines.append("")
    for hist in dict.fromkeys(r["history"] for r in rows):
        sizes = {r["bytes_per_user"] for r in rows if r["history"] == hist and r["appended"]}
        lines.append(f"history {hist}: bytes per cached user {', '.join(f'{s:,}' for s in sorted(sizes))} "
                     f"(at history - appended actions)")
    by = {(r["history"], r["appended"], r["path"], r["batch_size"]): r for r in rows}
    for (hist, appended, path, batch), r in by.items():
        if path == "host_hit" and (hist, appended, "device_hit", batch) in by:
            ratio = r["p50_ms"] / by[(hist, appended, "device_hit", batch)]["p50_ms"]
            lines.append(f"history {hist} +{appended} b={batch}: host hit / device hit p50 = {ratio:.2f}")
    return "\n".join(lines) + "\n"


def _config(overrides: list[str]):
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.serving.config import load_config

    try:
        return load_config(["+bench=default", *overrides])
    except (HydraException, OmegaConfBaseException) as err:
        raise PipelineError(f"bad config override: {err}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. bench.iters=50 bench.warmup=5")
    parser.add_argument("--workload", default=None, choices=sorted(WORKLOADS),
                        help="default: incremental-1m on a GPU, incremental-cpu on the CPU")
    parser.add_argument("--smoke", action="store_true", help="the incremental-smoke shape, 1 warm-up, 3 iterations")
    parser.add_argument("--precision", default=None, choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--kernels", default=None, choices=kernels.BACKENDS,
                        help="both sides' kernels (default: triton on a GPU, reference on the CPU)")
    parser.add_argument("--histories", type=int, nargs="+", default=None,
                        help="only these of the workload's history lengths (e.g. --histories 1000)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one call per path (first history, first append, largest batch) into OUT")
    parser.add_argument("--out", type=Path, default=None, help="default: <artifacts_dir>/bench/incremental-<UTC time>")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        cfg = _config(args.overrides)
    except PipelineError as err:
        parser.error(str(err))
    bcfg = cfg.bench
    configured = bcfg.workload if bcfg.workload in WORKLOADS else None  # make bench ARGS="bench.workload=incremental-1m"
    if bcfg.workload is not None and configured is None and str(bcfg.workload).startswith("incremental"):
        parser.error(f"unknown bench.workload '{bcfg.workload}'; incremental workloads: {', '.join(sorted(WORKLOADS))}")
    name = "incremental-smoke" if args.smoke else args.workload or configured or (
        "incremental-1m" if device.type == "cuda" else "incremental-cpu")
    workload = WORKLOADS[name]
    if args.histories:
        unknown = sorted(set(args.histories) - set(workload.histories))
        if unknown:
            parser.error(f"--histories {unknown}: {name} has histories {list(workload.histories)}")
        workload = dataclasses.replace(workload, histories=tuple(h for h in workload.histories if h in args.histories))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    backend = args.kernels or ("triton" if device.type == "cuda" else "reference")
    if backend == "triton" and not kernels.triton_runs_on(device):
        parser.error("--kernels triton needs a CUDA device (or TRITON_INTERPRET=1)")
    warmup = 1 if args.smoke else bcfg.warmup if bcfg.warmup is not None else 10 if device.type == "cuda" else 3
    iters = 3 if args.smoke else bcfg.iters or (100 if device.type == "cuda" else 20)
    if device.type == "cpu":
        torch.set_num_threads(bcfg.num_threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    out = args.out or Path(cfg.artifacts_dir) / "bench" / (
        "incremental-" + datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%S"))
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    facts = {"workload": name, "device": device_name, "dtype": precision, "kernels": backend, "torch": torch.__version__,
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "command": " ".join([Path(sys.executable).name, "-m", "pipeline.bench.incremental", *(argv or sys.argv[1:])])}
    print(f"# {name} on {device_name}: {precision}, kernels {backend}, warm-up {warmup}, {iters} iterations", flush=True)
    with kernels.use(backend):
        rows = run_workload(workload, device, DTYPES[precision], warmup, iters, log=lambda s: print(s, flush=True),
                           profile_dir=out if args.profile else None)
    with open(out / "incremental.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    text = table(rows, facts)
    (out / "incremental.md").write_text(text)
    print("\n" + text + f"\nwritten: {out / 'incremental.csv'}, {out / 'incremental.md'}", flush=True)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
