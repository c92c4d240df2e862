"""python -m pipeline.serving.loadtest: a bounded load on the deployed ensemble, over loopback.

    make loadtest ARGS="--requests 2000 --concurrency 8"

Sends --requests requests, --concurrency at a time (one user's history each, drawn from the deployed
package's test histories), and reports what the client saw (throughput, p50/p99 latency, errors) beside
what the server counted for the same interval (Prometheus metrics: requests, batches, queue and compute
time per model). Results go to <serving.root>/loadtest.json too.
"""
from __future__ import annotations

import argparse
import json
import re
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.core import PipelineError
from pipeline.serving.client import GenrecClient, RequestRejected

_SAMPLE = re.compile(r'^(nv_inference_\w+)\{model="([^"]+)",version="([^"]*)"\} ([0-9.e+-]+)$')
_COUNTERS = ("request_success", "request_failure", "count", "exec_count", "queue_duration_us",
             "compute_infer_duration_us", "request_duration_us")


def run_load(url: str, model: str, histories: list[list[int]], k: int, requests: int, concurrency: int,
             protocol: str = "http", timestamps: list[list[int]] | None = None) -> dict:
    """-> client-side results: requests, errors, seconds, throughput, latency percentiles."""
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
                start = time.perf_counter()
                try:
                    client.recommend(histories[i % len(histories)], k,
                                     None if timestamps is None else timestamps[i % len(histories)])
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
    seconds = time.perf_counter() - start
    ms = np.array(latencies) if latencies else np.array([float("nan")])
    return {"requests": requests, "concurrency": concurrency, "k": k, "protocol": protocol, "ok": len(latencies),
            "errors": len(errors), "first_errors": sorted(set(errors))[:3], "seconds": seconds,
            "throughput_rps": len(latencies) / seconds, "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def scrape(metrics_url: str) -> dict[tuple[str, str], float]:
    """The server's per-model inference counters: {(counter, model): value}, summed over versions."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    values: dict[tuple[str, str], float] = defaultdict(float)
    for line in text.splitlines():
        if m := _SAMPLE.match(line):
            values[(m.group(1).removeprefix("nv_inference_"), m.group(2))] += float(m.group(4))
    return values


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
    args = parser.parse_intermixed_args()
    cfg = load_config(args.overrides)
    server = LocalServer(cfg.serving)
    record = deployed(server.root)
    if record is None or not server.is_live():
        raise PipelineError(f"nothing serves on {server.url}: run `make deploy` first")
    package = read_package(Path(record["package"]))
    histories, times = package.examples, package.example_timestamps
    url = server.url if args.protocol == "http" else server.grpc_url
    model = cfg.serving.model_name
    run_load(url, model, histories, args.k, args.warmup, args.concurrency, args.protocol, times)
    before = scrape(server.metrics_url)
    client = run_load(url, model, histories, args.k, args.requests, args.concurrency, args.protocol, times)
    result = {"version": record["version"], "variant": record["variant"], "client": client,
              "server": server_side(before, scrape(server.metrics_url)), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    (server.root / "loadtest.json").write_text(json.dumps(result, indent=2))
    print(report(result))
    return 1 if client["errors"] else 0


def report(result: dict) -> str:
    c = result["client"]
    lines = [f"version {result['version']} ({result['variant']}): {c['ok']}/{c['requests']} ok, {c['errors']} errors, "
             f"concurrency {c['concurrency']}, {c['protocol']}, k={c['k']}",
             f"client: {c['throughput_rps']:.1f} requests/s, p50 {c['p50_ms']:.2f} ms, p90 {c['p90_ms']:.2f} ms, "
             f"p99 {c['p99_ms']:.2f} ms",
             "server (Prometheus, same interval):",
             f"  {'model':<22} {'requests':>9} {'batches':>8} {'mean batch':>10} {'queue ms':>9} {'compute ms':>10}"]
    for model, s in result["server"].items():
        lines.append(f"  {model:<22} {s['requests']:>9.0f} {s['batches']:>8.0f} {s['mean_batch']:>10.2f} "
                     f"{s['queue_ms']:>9.3f} {s['compute_ms']:>10.3f}")
    lines += [f"  first errors: {e}" for e in c["first_errors"]]
    return "\n".join(lines)


if __name__ == "__main__":
    from pipeline.serving.config import main_guard

    main_guard(main)
