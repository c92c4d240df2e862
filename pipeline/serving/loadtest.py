"""python -m pipeline.serving.loadtest: a bounded load on the deployed ensemble, over loopback.

    make loadtest ARGS="--requests 2000 --concurrency 8"

Sends --requests requests, --concurrency at a time (one user's history each, drawn from the deployed
package's test histories), and reports what the client saw (throughput, p50/p99 latency, errors) beside
what the server counted for the same interval (Prometheus metrics: requests, batches, queue and compute
time per model). Results go to <serving.root>/loadtest.json too.

    make loadtest ARGS="--returning-users --users 1000 --requests 5000"

--returning-users: a population of users who come back (Zipf: a few often, most rarely). Each user starts
from a short history (a packaged test history cut to a few actions, or random known items), each visit
appends 1-5 random known items and sends the whole history (its last max_len actions) with the user's
USER_ID. Beside the client's numbers it reports the engine's user-state cache over the interval (the
server's genrec_cache_* metrics): hits per tier, misses, evictions, and the engine time per path. A history
that outgrows max_len slides its window: every visit from then on is a miss (docs/INCREMENTAL.md).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.core import PipelineError
from pipeline.serving.client import GenrecClient, RequestRejected

# A sample line: name{label="value",...} number. On a GPU host an instance on a GPU adds gpu_uuid="..." before
# model=, and its counters appear only under that label set (the plain one stays 0): labels in any order.
_SAMPLE = re.compile(r'^(\w+)\{([^}]*)\} ([0-9.e+-]+)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')
# The engine sends its genrec_cache_* metrics every half second (engine_torch.CacheMetrics.FLUSH_S): a snapshot
# of them is taken this long after the last request, or it misses that request's counts.
CACHE_METRICS_SETTLE_S = 0.7
_COUNTERS = ("request_success", "request_failure", "count", "exec_count", "queue_duration_us",
             "compute_infer_duration_us", "request_duration_us")


class ReturningUsers:
    """Visits of a user population: next() -> (user id, the history to send). Thread-safe."""

    def __init__(self, users: int, starts: list[list[int]], items: np.ndarray, max_len: int, seed: int = 0,
                 zipf: float = 1.1, max_start: int = 4, max_new: int = 5) -> None:
        if users < 1:
            raise PipelineError(f"--users must be >= 1, got {users}")
        self.rng, self.items, self.max_len, self.max_new = np.random.default_rng(seed), np.asarray(items), max_len, max_new
        weights = 1.0 / np.arange(1, users + 1) ** zipf
        self.p = weights / weights.sum()
        self.order = self.rng.permutation(users)  # which user ids are the frequent ones
        self.histories: dict[int, list[int]] = {}
        self.starts, self.max_start = [s for s in starts if s] or [[int(self.rng.choice(self.items))]], max_start
        self.lock = threading.Lock()

    def next(self) -> tuple[int, list[int]]:
        with self.lock:
            user = int(self.order[self.rng.choice(len(self.p), p=self.p)])
            history = self.histories.get(user)
            if history is None:  # a first visit: a short start, so that many visits fit in max_len
                start = self.starts[int(self.rng.integers(len(self.starts)))]
                history = list(start[: int(self.rng.integers(1, self.max_start + 1))])
            else:
                history = history + [int(i) for i in self.rng.choice(self.items, int(self.rng.integers(1, self.max_new + 1)))]
            self.histories[user] = history = history[-self.max_len:]  # past max_len the window slides
            return user, history


def run_load(url: str, model: str, histories: list[list[int]], k: int, requests: int, concurrency: int,
             protocol: str = "http", visits: ReturningUsers | None = None,
             timestamps: list[list[int]] | None = None) -> dict:
    """-> client-side results: requests, errors, seconds, throughput, latency percentiles. With `visits`,
    each request is a returning user's next visit (its history and USER_ID) instead of a packaged history;
    `timestamps`: the packaged histories' times, for a time-bias model."""
    latencies: list[float] = []
    errors: list[str] = []
    lock, issued = threading.Lock(), iter(range(requests))

    def worker() -> None:
        client = GenrecClient(url, model, protocol)
        try:
            while True:
                with lock:
                    i = next(issued, None)
                if i is None:
                    return
                user, history = visits.next() if visits else (None, histories[i % len(histories)])
                start = time.perf_counter()
                try:
                    client.recommend(history, k, user,
                                     None if timestamps is None or visits else timestamps[i % len(histories)])
                except RequestRejected as err:
                    with lock:
                        errors.append(str(err))
                    continue
                with lock:
                    latencies.append((time.perf_counter() - start) * 1e3)
        finally:
            client.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _summary(requests, concurrency, k, protocol, latencies, errors, time.perf_counter() - start, 1)


def _summary(requests: int, concurrency: int, k: int, protocol: str, latencies: list[float], errors: list[str],
             seconds: float, processes: int) -> dict:
    ms = np.array(latencies) if latencies else np.array([float("nan")])
    return {"requests": requests, "concurrency": concurrency, "k": k, "protocol": protocol, "ok": len(latencies),
            "errors": len(errors), "first_errors": sorted(set(errors))[:3], "seconds": seconds,
            "throughput_rps": len(latencies) / seconds, "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "processes": processes, "latencies_ms": latencies}


def default_processes(concurrency: int) -> int:
    """Client processes for a load: one per 8 concurrent requests, at most half the host's cores. One Python
    process's threads share one interpreter lock: on the H200's host 32 threads topped out near 2,500 requests/s
    while the server had room, so a load of one process measured the client."""
    return max(1, min(concurrency // 8, (os.cpu_count() or 2) // 2))


def _load_part(queue, barrier, args: tuple) -> None:
    """One client process of run_load_processes: waits for the others, runs its share, reports."""
    try:
        barrier.wait(timeout=120)
        start = time.time()
        result = run_load(*args)
        queue.put((start, time.time(), result, None))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises it
        queue.put((0.0, 0.0, None, f"{type(err).__name__}: {err}"))


def run_load_processes(processes: int, url: str, model: str, histories: list[list[int]], k: int, requests: int,
                       concurrency: int, protocol: str = "http", timestamps: list[list[int]] | None = None) -> dict:
    """run_load spread over `processes` client processes (requests and concurrency split between them), started
    together; throughput over the wall time from the first start to the last finish, percentiles over every
    request. processes=1 is run_load itself."""
    if processes <= 1:
        return run_load(url, model, histories, k, requests, concurrency, protocol, None, timestamps)
    processes = min(processes, concurrency, requests)
    ctx = multiprocessing.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(processes)
    shares = zip(np.array_split(np.arange(requests), processes), np.array_split(np.arange(concurrency), processes))
    workers = [ctx.Process(target=_load_part, args=(queue, barrier, (url, model, histories, k, len(r), len(c),
                                                                     protocol, None, timestamps)), daemon=True)
               for r, c in shares]
    for w in workers:
        w.start()
    parts = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    failed = [why for *_, why in parts if why]
    if failed:
        raise PipelineError(f"a load-test client process failed: {failed[0]}")
    latencies = [ms for _, _, r, _ in parts for ms in r["latencies_ms"]]
    errors = [e for _, _, r, _ in parts for e in r["first_errors"]]
    result = _summary(requests, concurrency, k, protocol, latencies, errors,
                      max(end for _, end, _, _ in parts) - min(start for start, *_ in parts), processes)
    result["errors"] = sum(r["errors"] for _, _, r, _ in parts)
    return result


def scrape(metrics_url: str) -> dict[tuple[str, str], float]:
    """The server's per-model inference counters: {(counter, model): value}, summed over versions and GPUs."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        return parse_metrics(response.read().decode())


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """Prometheus text -> {(counter, model): value}, summed over every label set of a model."""
    values: dict[tuple[str, str], float] = defaultdict(float)
    for name, labels, value in _samples(text, "nv_inference_"):
        if "model" in labels:
            values[(name, labels["model"])] += value
    return values


def _samples(text: str, prefix: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """The samples of the metrics named prefix*: (name without the prefix, labels, value)."""
    for line in text.splitlines():
        if line.startswith(prefix) and (m := _SAMPLE.match(line)):
            yield m.group(1).removeprefix(prefix), dict(_LABEL.findall(m.group(2))), float(m.group(3))


def scrape_cache(metrics_url: str) -> dict[tuple[str, str, str], float]:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        return parse_cache_metrics(response.read().decode())


def parse_cache_metrics(text: str) -> dict[tuple[str, str, str], float]:
    """The engines' genrec_cache_* metrics: {(metric, model, tier or path or ""): value}."""
    values: dict[tuple[str, str, str], float] = defaultdict(float)
    for name, labels, value in _samples(text, "genrec_cache_"):
        values[(name, labels.get("model", ""), labels.get("tier", labels.get("path", "")))] += value
    return values


def cache_side(before: dict, after: dict) -> dict[str, dict]:
    """Per engine over the interval: hits per tier, misses, stale, evictions per tier, bytes and users held
    now, and rows and mean engine time (ms) per path."""
    out: dict[str, dict] = {}
    for model in sorted({model for _, model, _ in after}):
        def delta(name: str, label: str = "") -> float:
            return after.get((name, model, label), 0.0) - before.get((name, model, label), 0.0)

        paths = {}
        for path in ("device_hit", "host_hit", "miss", "no_user"):
            rows = delta("path_rows", path)
            paths[path] = {"rows": rows, "mean_ms": delta("path_duration_us", path) / rows / 1e3 if rows else None}
        out[model] = {"hits_device": delta("hits", "device"), "hits_host": delta("hits", "host"),
                      "misses": delta("misses"), "stale": delta("stale"),
                      "evictions_device": delta("evictions", "device"), "evictions_host": delta("evictions", "host"),
                      "bytes_device": after.get(("bytes", model, "device"), 0.0),
                      "bytes_host": after.get(("bytes", model, "host"), 0.0),
                      "users_device": after.get(("entries", model, "device"), 0.0),
                      "users_host": after.get(("entries", model, "host"), 0.0), "paths": paths}
    return out


def server_side(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per model over the interval: requests, batches executed, mean batch size, mean queue and compute time."""
    models = sorted({model for _, model in after})
    out = {}
    for model in models:
        d = {c: after.get((c, model), 0.0) - before.get((c, model), 0.0) for c in _COUNTERS}
        done = max(d["request_success"] + d["request_failure"], 1.0)
        out[model] = {"requests": d["request_success"], "failures": d["request_failure"],
                      "batches": d["exec_count"], "mean_batch": d["count"] / max(d["exec_count"], 1.0),
                      "queue_ms": d["queue_duration_us"] / done / 1e3,
                      "compute_ms": d["compute_infer_duration_us"] / done / 1e3,
                      "request_ms": d["request_duration_us"] / done / 1e3}
    return out


def main() -> int:
    from pipeline.serving.config import load_config
    from pipeline.serving.package import read_package
    from pipeline.serving.rollout import deployed
    from pipeline.serving.server import LocalServer

    parser = argparse.ArgumentParser(prog="python -m pipeline.serving.loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. serving.http_port=8010")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--warmup", type=int, default=50, help="requests sent first, not counted")
    parser.add_argument("--returning-users", action="store_true",
                        help="users who come back with a few new actions, sent with their USER_ID")
    parser.add_argument("--users", type=int, default=1000, help="with --returning-users: the population")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=None,
                        help="client processes sharing the load (default: one per 8 of --concurrency, at most half "
                             "the cores; 1 with --returning-users, whose users' histories live in one process)")
    args = parser.parse_intermixed_args()
    cfg = load_config(args.overrides)
    server = LocalServer(cfg.serving)
    record = deployed(server.root)
    if record is None or not server.is_live():
        raise PipelineError(f"nothing serves on {server.url}: run `make deploy` first")
    package = read_package(Path(record["package"]))
    histories, times = package.examples, package.example_timestamps
    if args.returning_users and times is not None:
        raise PipelineError("--returning-users sends no TIMESTAMPS, which this time-bias model needs")
    visits = (ReturningUsers(args.users, histories, package.vocabulary.raw[1:], package.max_len, args.seed)
              if args.returning_users else None)
    url = server.url if args.protocol == "http" else server.grpc_url
    model = cfg.serving.model_name
    run_load(url, model, histories, args.k, args.warmup, args.concurrency, args.protocol, visits, times)
    if visits:
        time.sleep(CACHE_METRICS_SETTLE_S)
    before, cache_before = scrape(server.metrics_url), scrape_cache(server.metrics_url)
    if args.processes is not None and args.processes < 1:
        raise PipelineError(f"--processes must be >= 1, got {args.processes}")
    processes = 1 if visits else args.processes or default_processes(args.concurrency)
    if processes > 1:
        client = run_load_processes(processes, url, model, histories, args.k, args.requests, args.concurrency,
                                    args.protocol, times)
    else:
        client = run_load(url, model, histories, args.k, args.requests, args.concurrency, args.protocol, visits, times)
    client.pop("latencies_ms", None)
    if visits:
        time.sleep(CACHE_METRICS_SETTLE_S)
    result = {"version": record["version"], "variant": record["variant"], "model": model, "client": client,
              "server": server_side(before, scrape(server.metrics_url)), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if visits:
        result["returning_users"] = {"users": args.users, "visited": len(visits.histories),
                                     "cache": cache_side(cache_before, scrape_cache(server.metrics_url))}
    (server.root / "loadtest.json").write_text(json.dumps(result, indent=2))
    print(report(result))
    return 1 if client["errors"] else 0


def report(result: dict) -> str:
    c = result["client"]
    lines = [f"version {result['version']} ({result['variant']}): {c['ok']}/{c['requests']} ok, {c['errors']} errors, "
             f"concurrency {c['concurrency']}, {c['protocol']}, k={c['k']}"
             + (f", {c['processes']} client processes" if c.get("processes", 1) > 1 else ""),
             f"client: {c['throughput_rps']:.1f} requests/s, p50 {c['p50_ms']:.2f} ms, p90 {c['p90_ms']:.2f} ms, "
             f"p99 {c['p99_ms']:.2f} ms",
             "server (Prometheus, same interval):",
             f"  {'model':<22} {'requests':>9} {'batches':>8} {'mean batch':>10} {'queue ms':>9} {'compute ms':>10} "
             f"{'request ms':>10}"]
    for model, s in result["server"].items():
        lines.append(f"  {model:<22} {s['requests']:>9.0f} {s['batches']:>8.0f} {s['mean_batch']:>10.2f} "
                     f"{s['queue_ms']:>9.3f} {s['compute_ms']:>10.3f} {s.get('request_ms', 0.0):>10.3f}")
    models = result["server"]
    ensemble = models.get(result.get("model", ""), {})
    if ensemble.get("requests") and c.get("mean_ms"):
        # Where a request's time goes (means): the client's round trip, the server's time for the ensemble
        # (its steps and the hops between them), and the engine's own compute.
        engine = sum(s["compute_ms"] for name, s in models.items() if name.endswith("_engine"))
        lines.append(f"per request (means): client {c['mean_ms']:.3f} ms = outside the server "
                     f"{c['mean_ms'] - ensemble['request_ms']:.3f} + in the server {ensemble['request_ms']:.3f} ms "
                     f"(engine compute {engine:.3f} ms, other steps and hops "
                     f"{ensemble['request_ms'] - engine:.3f} ms)")
    if "returning_users" in result:
        r = result["returning_users"]
        lines.append(f"returning users: {r['visited']} of {r['users']} came; failed requests {c['errors']}")
        if not r["cache"]:
            lines.append("  no genrec_cache_* metrics: the engine keeps no user-state cache (its log at load says why)")
        for model, m in r["cache"].items():
            lines.append(f"  {model}: hits device {m['hits_device']:.0f}, host {m['hits_host']:.0f}; misses "
                         f"{m['misses']:.0f} (stale {m['stale']:.0f}); evictions device {m['evictions_device']:.0f}, "
                         f"host {m['evictions_host']:.0f}; holds {m['users_device']:.0f} users "
                         f"({m['bytes_device'] / 2**20:.1f} MiB) on the device, {m['users_host']:.0f} "
                         f"({m['bytes_host'] / 2**20:.1f} MiB) on the host")
            for path, p in m["paths"].items():
                if p["rows"]:
                    lines.append(f"    {path:<11} {p['rows']:>8.0f} rows, engine {p['mean_ms']:.3f} ms per row's batch")
    lines += [f"  first errors: {e}" for e in c["first_errors"]]
    return "\n".join(lines)


if __name__ == "__main__":
    from pipeline.serving.config import main_guard

    main_guard(main)
