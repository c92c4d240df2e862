"""Triton python model: the variant loaded by the pipeline's own loader (eager, torch.compile, AOTInductor:
whatever pipeline.variants knows), so the server answers exactly as validate measured it.

Needs this project importable by the stub's Python: the local server names it in PYTHONPATH.
Requests queued together by the dynamic batcher run as one batch, padded to the smallest of the engine's
batch buckets that holds it (genrec_common.batch_buckets). initialize() calls the variant at every bucket
(with none, at batch 1 and 2) so that whatever happens at the first call of a shape (torch.compile: a hit in
Inductor's on-disk caches the pipeline filled; a CUDA-graph capture; the kernels' choice per shape) does so
while the model loads, never under a request.

Returning users (docs/INCREMENTAL.md): each row comes with a user id (-1: none, preprocess fills it in). With
serving.cache on and an HSTU variant whose modules the engine can reach (eager, inductor), rows with a user id
are answered by IncrementalRetriever over the instance's KVCache (its device tier on the instance's device),
encoding only the actions appended since the user's last request; rows without one take the variant's own
call, as without a cache. Any other variant (ONNX, AOTInductor, SASRec, ...) serves every row with its own
call and the log says why once. The cache is per instance: with instance_group.count > 1 a user's requests
may land on another instance's cache. Counters, bytes and engine time per path are exported as genrec_cache_*
metrics on the server's metrics endpoint.
"""
import json
import locale
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np


def _utf8_locale() -> None:
    """The stub's Python starts isolated: no UTF-8 mode and no locale from the environment, so with no
    locale set its default text encoding is ASCII, and Inductor reads its UTF-8 code templates with it
    (UnicodeDecodeError at load). open() asks the C locale each time: a UTF-8 one fixes it."""
    if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
        return
    for name in ("C.UTF-8", "C.utf8", "en_US.UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
            return
        except locale.Error:
            continue


_utf8_locale()
# The stub's Python ignores the environment (sys.flags.ignore_environment), PYTHONPATH included.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import torch  # noqa: E402  (after the locale: torch._inductor reads files at import)
import triton_python_backend_utils as pb_utils  # noqa: E402
from genrec_common import batch_buckets, bucket_for, from_triton, pad_rows, to_triton  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        from pipeline.core import Variant
        from pipeline.variants import load_variant

        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        here = Path(args["model_repository"]) / args["model_version"]
        spec = json.loads((here / "variant.json").read_text())
        spec["artifact"] = str(here / spec["artifact"])
        gpu = args["model_instance_kind"] == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        torch.set_num_threads(int(params["threads"]))
        config = json.loads(args["model_config"])
        self.buckets = batch_buckets(params.get("batch_buckets", "auto"), int(config["max_batch_size"]), gpu)
        self.time_bias = params.get("time_bias") == "true"  # requests then carry TIMESTAMPS (preprocess pads them)
        start = time.perf_counter()
        self.variant = spec["name"]
        self.predict = load_variant(Variant(**spec), self.device, int(params["max_k"]))
        loaded = time.perf_counter()
        warm_detail = self._warm(int(params["max_len"]))
        warmed = time.perf_counter()
        self.incremental, self.metrics, why = self._incremental(params, args["model_name"])
        cache = f"no user-state cache: {why}"
        if self.incremental:
            kv = self.incremental.cache
            cache = (f"user-state cache of {kv.budget['device'] / 2**30:.1f} GiB on the device and "
                     f"{kv.budget['host'] / 2**30:.1f} GiB on the host ({kv.num_pages} device pages of "
                     f"{kv.page_size} positions, {getattr(self, 'graph_shapes', 0)} CUDA-graph shapes warmed)")
        pb_utils.Logger.log_info(f"{args['model_name']}: {spec['name']} loaded and warmed in "
                                 f"{time.perf_counter() - start:.1f} s on {self.device} (load {loaded - start:.1f} s, "
                                 f"batch buckets {self.buckets or 'none'} {warmed - loaded:.1f} s {warm_detail}, user-state cache "
                                 f"{time.perf_counter() - warmed:.1f} s); {cache}")

    def _incremental(self, params, name):
        """-> (IncrementalRetriever, CacheMetrics, None), or (None, None, why rows are served without a cache)."""
        from pipeline.catalogue import eager_form
        from pipeline.serving.kvcache import IncrementalRetriever, KVCache

        if params.get("cache_enabled", "false") != "true":
            return None, None, "serving.cache.enabled=false"
        form = eager_form(self.predict)
        if form is None:
            return None, None, f"{self.variant} runs an exported artifact: the engine cannot reach the model's modules"
        retriever, self.kernel_choice = form
        cache = KVCache(int(params["cache_gpu_bytes"]), int(params["cache_host_bytes"]), self.device,
                        page_size=int(params.get("cache_page_size", 64)))
        incremental = IncrementalRetriever(retriever, cache, namespace=name,
                                           cuda_graphs=params.get("cache_cuda_graphs", "true") == "true")
        if incremental.reason:
            return None, None, incremental.reason
        self._warm_incremental(incremental, int(params["max_len"]))
        with torch.inference_mode(), self.kernel_choice():  # the served stream's CUDA graphs (GPU only)
            self.graph_shapes = incremental.warm_graphs(max(self.buckets or [8]))
        return incremental, CacheMetrics(name, cache.stats()), None

    def _warm_incremental(self, incremental, max_len: int) -> None:
        """A miss and a hit of one throwaway user on a cache of its own, so that whatever the incremental path
        does at its first call (a kernel's compile) happens while the model loads."""
        from pipeline.serving.kvcache import IncrementalRetriever, KVCache

        length = max(1, max_len // 2)
        budget = 2 * incremental.bytes_per_user(max_len)  # with max_len-position pages: two users
        warm = IncrementalRetriever(incremental.retriever, KVCache(budget, 0, self.device, page_size=max_len),
                                    incremental.namespace.decode())
        history = torch.ones(1, max_len, dtype=torch.int64, device=self.device)
        times = torch.zeros_like(history) if self.time_bias else None
        with torch.inference_mode(), self.kernel_choice():
            for n in (length, min(length + 1, max_len)):
                warm.recommend(history, torch.tensor([n], device=self.device), ["warm"], times)

    def _warm(self, max_len: int) -> str:
        """-> what the warm-up took per bucket, and what Inductor found in its caches (a miss compiles)."""
        # Only a torch.compile variant has imported Dynamo (its import alone takes seconds): others count nothing.
        counters = getattr(sys.modules.get("torch._dynamo.utils"), "counters", None)
        if counters is None:  # (not `or {}`: Dynamo's counters are an empty defaultdict until something counts)
            counters = {}
        before = {key: dict(counters.get(key, {})) for key in ("inductor", "aot_autograd")}
        took = []
        # From the smallest bucket up. The order does not decide Inductor's cache hits: batch 1 has its own
        # graph, every larger size shares one dynamic graph whatever size made it (on the CPU, validate's made
        # at 128 served this engine's 16). What did decide them was the process's matmul settings, which
        # Inductor keys on (see pipeline.stages.train.fit).
        for batch in sorted(self.buckets or [1, 2]):
            start = time.perf_counter()
            history = torch.ones(batch, max_len, dtype=torch.int64, device=self.device)
            times = torch.zeros_like(history) if self.time_bias else None
            with torch.inference_mode():
                self.predict(history, torch.ones(batch, dtype=torch.int64, device=self.device), times)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            took.append(f"{batch}: {time.perf_counter() - start:.1f} s")

        def new(key, name):
            return counters.get(key, {}).get(name, 0) - before[key].get(name, 0)

        graphs = {what: new("inductor", f"fxgraph_cache_{what}") for what in ("hit", "miss", "bypass")}
        autograd = {what: new("aot_autograd", f"autograd_cache_{what}") for what in ("hit", "miss", "bypass")}
        caches = ""
        if any(graphs.values()) or any(autograd.values()):
            caches = ("; Inductor's graph cache " + ", ".join(f"{n} {w}" for w, n in graphs.items() if n)
                      + ", AOTAutograd's " + (", ".join(f"{n} {w}" for w, n in autograd.items() if n) or "unused"))
        return f"({', '.join(took)}{caches})"

    def execute(self, requests):
        history = [from_triton(pb_utils.get_input_tensor_by_name(r, "HISTORY")) for r in requests]
        lengths = [from_triton(pb_utils.get_input_tensor_by_name(r, "LENGTHS")) for r in requests]
        users = [from_triton(pb_utils.get_input_tensor_by_name(r, "USER_ID")) for r in requests]
        times = None
        if self.time_bias:
            times = np.concatenate([from_triton(pb_utils.get_input_tensor_by_name(r, "TIMESTAMPS")) for r in requests])
        try:
            ids, scores = self.compute(np.concatenate(history), np.concatenate(lengths), np.concatenate(users), times)
        except Exception as err:  # the whole batch fails alike; the server keeps serving
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"engine failed: {err}")) for _ in requests]
        bounds = np.cumsum([len(h) for h in history])[:-1]
        return [pb_utils.InferenceResponse([to_triton(pb_utils, "TOP_IDS", i), to_triton(pb_utils, "TOP_SCORES", s)])
                for i, s in zip(np.split(ids, bounds), np.split(scores, bounds))]

    def finalize(self):
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()

    def compute(self, batch: np.ndarray, lengths: np.ndarray, users: np.ndarray, times: np.ndarray | None):
        """One batch: history [B, max_len] model ids, lengths [B(, 1)], user ids [B(, 1)] (-1: none), times
        [B, max_len] or None -> numpy (ids [B, max_k], scores [B, max_k]); the cache's metrics updated."""
        start = time.perf_counter()
        rows_in, users = lengths.reshape(-1), users.reshape(-1)
        with torch.inference_mode():
            if self.incremental is None or (users < 0).all():
                ids, scores = self._predict(batch, rows_in, times)
                paths = ["no_user"] * len(batch)
            else:
                ids, scores, paths = self._with_cache(batch, rows_in, users, times)
        if self.metrics is not None:
            self.metrics.update(self.incremental.cache.stats(), paths, (time.perf_counter() - start) * 1e6)
        return ids, scores

    def _predict(self, batch: np.ndarray, lengths: np.ndarray, times: np.ndarray | None):
        """The variant's own call, at the smallest batch bucket that holds the rows -> numpy (ids, scores)."""
        rows = bucket_for(len(batch), self.buckets)
        ids, scores = self.predict(torch.from_numpy(pad_rows(batch, rows)).to(self.device),
                                   torch.from_numpy(pad_rows(lengths, rows)).to(self.device),
                                   None if times is None else torch.from_numpy(pad_rows(times, rows)).to(self.device))
        return ids[: len(batch)].cpu().numpy(), scores[: len(batch)].float().cpu().numpy()

    def _with_cache(self, batch: np.ndarray, lengths: np.ndarray, users: np.ndarray, times: np.ndarray | None):
        """Rows with a user id through the cache (hits and misses in one ragged batch), the others through the
        variant's own call, exactly as without a cache -> numpy (ids, scores), each row's path."""
        known = np.flatnonzero(users >= 0)
        # Host tensors: the cache reads the histories on the host and copies to the device what it needs.
        with self.kernel_choice():
            ids, scores, paths = self.incremental.recommend_detailed(
                torch.from_numpy(batch[known]), torch.from_numpy(lengths[known]), torch.from_numpy(users[known]),
                None if times is None else torch.from_numpy(times[known]))
        if len(known) == len(batch):
            return ids.cpu().numpy(), scores.float().cpu().numpy(), paths
        others = np.flatnonzero(users < 0)
        other_ids, other_scores = self._predict(batch[others], lengths[others], None if times is None else times[others])
        all_ids = np.empty((len(batch), ids.shape[1]), dtype=np.int64)
        all_scores = np.empty((len(batch), ids.shape[1]), dtype=np.float32)
        all_ids[known], all_scores[known] = ids.cpu().numpy(), scores.float().cpu().numpy()
        all_ids[others], all_scores[others] = other_ids, other_scores
        every = ["no_user"] * len(batch)
        for row, path in zip(known, paths):
            every[row] = path
        return all_ids, all_scores, every


class CacheMetrics:
    """The cache's counters and bytes, and the engine's time per path, as genrec_cache_* metrics (the python
    backend's custom metrics, on the server's metrics endpoint), labelled with the engine's model name. A row's
    time is its whole batch's time in execute(): what the row waited for.

    Each metric update is a message from the stub to the server: two of them per request (rows and time of
    its path) cost about 0.2 ms of a 1.2 ms request on the CPU server. So updates accumulate here and are sent
    at most every FLUSH_S seconds, from execute() when one is due and from a timer thread when the engine is
    idle: the server's figures trail the engine's by at most FLUSH_S (the load test waits
    loadtest.CACHE_METRICS_SETTLE_S before a snapshot)."""

    TIERS = ("device", "host")
    PATHS = ("device_hit", "host_hit", "miss", "no_user")
    FLUSH_S = 0.5

    def __init__(self, model: str, stats: dict) -> None:
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE

        def family(name, kind, description):
            made = pb_utils.MetricFamily(name=name, description=description, kind=kind)
            self._families.append(made)  # a family must outlive its metrics
            return made

        self._families = []
        hits = family("genrec_cache_hits", counter, "Rows answered from the user-state cache, by tier")
        misses = family("genrec_cache_misses", counter, "Rows with a user id that encoded their whole history")
        stale = family("genrec_cache_stale", counter, "Misses whose cached entry did not match the history's prefix")
        evictions = family("genrec_cache_evictions", counter, "Users pushed out of a cache tier")
        nbytes = family("genrec_cache_bytes", gauge, "Bytes the cache holds, by tier")
        entries = family("genrec_cache_entries", gauge, "Users the cache holds, by tier")
        rows = family("genrec_cache_path_rows", counter, "Rows served, by path (device_hit, host_hit, miss, no_user)")
        micros = family("genrec_cache_path_duration_us", counter,
                        "Engine time of the batches rows ran in, summed per row, by path (microseconds)")
        label = {"model": model}
        self.counters = {f"hits_{t}": hits.Metric(labels={**label, "tier": t}) for t in self.TIERS}
        self.counters.update({f"evictions_{t}": evictions.Metric(labels={**label, "tier": t}) for t in self.TIERS})
        self.counters["misses"] = misses.Metric(labels=label)
        self.counters["stale"] = stale.Metric(labels=label)
        self.gauges = {f"bytes_{t}": nbytes.Metric(labels={**label, "tier": t}) for t in self.TIERS}
        self.gauges.update({f"entries_{t}": entries.Metric(labels={**label, "tier": t}) for t in self.TIERS})
        self.rows = {p: rows.Metric(labels={**label, "path": p}) for p in self.PATHS}
        self.micros = {p: micros.Metric(labels={**label, "path": p}) for p in self.PATHS}
        self.sent = dict(stats)     # the cache's stats as the server has them
        self.stats = dict(stats)    # as the engine last saw them
        self.path_rows: Counter = Counter()
        self.path_micros: Counter = Counter()
        self.last_flush = time.monotonic()
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.timer = threading.Thread(target=self._flush_when_idle, name="genrec-cache-metrics", daemon=True)
        self.timer.start()

    def update(self, stats: dict, paths: list, micros: float) -> None:
        with self.lock:
            self.stats = dict(stats)
            for path, count in Counter(paths).items():
                self.path_rows[path] += count
                self.path_micros[path] += count * micros
            if time.monotonic() - self.last_flush >= self.FLUSH_S:
                self._flush()

    def close(self) -> None:
        """Send what is pending and stop the timer (the engine's finalize)."""
        self.closed.set()
        with self.lock:
            self._flush()

    def _flush_when_idle(self) -> None:
        while not self.closed.wait(self.FLUSH_S):
            with self.lock:
                if time.monotonic() - self.last_flush >= self.FLUSH_S:
                    try:
                        self._flush()
                    except Exception as err:  # noqa: BLE001 - the server went away; execute() flushes too
                        pb_utils.Logger.log_warn(f"genrec_cache metrics not sent: {err}")

    def _flush(self) -> None:
        """Only what changed is sent (callers hold the lock)."""
        stats = self.stats
        for key, metric in self.counters.items():
            if stats[key] != self.sent[key]:
                metric.increment(stats[key] - self.sent[key])
        for key, metric in self.gauges.items():
            if stats[key] != self.sent[key]:
                metric.set(stats[key])
        for path, count in self.path_rows.items():
            self.rows[path].increment(count)
            self.micros[path].increment(self.path_micros[path])
        self.sent = dict(stats)
        self.path_rows.clear()
        self.path_micros.clear()
        self.last_flush = time.monotonic()
