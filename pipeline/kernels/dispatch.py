"""Per-shape choice between our Triton kernels and their PyTorch reference, timed on the device.

A Triton kernel wins on large tables and long histories and can lose on small ones (a few thousand items,
short histories), where the reference's few library calls cost less than the kernel's launch and merge.
So each op's candidate list includes the reference, timed the same way as the kernel's configs, once per
shape key and process. "The same way" is the way the call is served: CUDA-graph replays (GPU time) for a
call that a CUDA graph replays (served_by_graph(True), set by CompiledRetriever), else launched op by op
and timed from the host, launch costs included (a short call is bound by them). The two are separate
choices, since one process may serve both. The choices are logged and readable here (dispatch_log()),
for validate and the bench to write out.

Tests inject a timer (timed_by) to make the choice deterministic; without one the CPU (interpreter)
takes each op's default untimed, and so does a GPU with GENREC_AUTOTUNE=0.

Choices timed on a GPU are kept on disk (a tuning cache beside Inductor's, GENREC_TUNING_CACHE to move it or
"off" to turn it off), keyed by the device, torch and triton versions and our kernels' source: the compile
stage tunes a shape once, and validate, the bench and the serving engine on the same host read its choice
instead of timing again (an engine loads in seconds rather than tuning at load).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

REFERENCE = "reference"
# A timer: (label of the candidate, a call of it) -> ms per call, or an array of per-call samples in ms.
Timer = Callable[[str, Callable[[], object]], "float | np.ndarray"]


@dataclass(frozen=True)
class Option:
    """One candidate: algorithm (REFERENCE or the kernel's own name), its config (anything hashable), the call
    to time, and `exact`: no row needs the caller's exactness check afterwards."""
    algorithm: str
    config: object
    run: Callable[[], object]
    exact: bool = True

    @property
    def label(self) -> str:
        return self.algorithm if self.config is None else f"{self.algorithm} {self.config}"


@dataclass(frozen=True)
class Choice:
    op: str
    key: tuple
    graphed: bool          # chosen for calls that a CUDA graph replays
    algorithm: str
    config: object
    exact: bool
    ms: float              # the chosen option's cost; nan when untimed
    reference_ms: float    # the reference's cost at this shape; nan when untimed
    timed: int             # options timed
    source: str = "timed"  # timed | cache (the tuning cache on disk) | untimed


_choices: dict[tuple[str, tuple, bool], Choice] = {}
# Every timing taken: (op, key, algorithm, config, ms per call (nan: the option failed), penalty ms added).
TUNING_LOG: list[tuple[str, tuple, str, object, float, float]] = []
_timer: Timer | None = None
_graphed = False
# The tuning cache on disk: its path once resolved (None: off), and its entries for this host's fingerprint.
_store_path: Path | None = None
_store_resolved = False
_store_explicit = False  # set by tuning_cache(): kept with an injected timer too
_store: dict[str, dict] | None = None


def choice(op: str, key: tuple) -> Choice | None:
    return _choices.get((op, key, _graphed))


def graphed() -> bool:
    """Whether the calls now running are replayed from a CUDA graph (see served_by_graph)."""
    return _graphed


@contextmanager
def served_by_graph(flag: bool) -> Iterator[None]:
    """Calls inside are served from a CUDA graph (flag) or launched op by op: which is timed, and which
    choice they use."""
    global _graphed
    before, _graphed = _graphed, flag
    try:
        yield
    finally:
        _graphed = before


def dispatch_log() -> list[dict]:
    """One row per (op, shape key) chosen so far in this process: what runs there, and the timings."""
    rows = []
    for c in _choices.values():
        row = asdict(c)
        row["key"], row["config"] = str(c.key), "" if c.config is None else str(c.config)
        row["speedup_vs_reference"] = c.reference_ms / c.ms if c.ms > 0 else float("nan")
        rows.append(row)
    return rows


def reset() -> None:
    """Forget every choice made in this process (tests; a bench that wants fresh tuning). The tuning cache on
    disk stays; GENREC_TUNING_CACHE=off (or tuning_cache(None)) keeps it out."""
    global _store
    _choices.clear()
    TUNING_LOG.clear()
    _store = None


@contextmanager
def tuning_cache(path: str | Path | None) -> Iterator[None]:
    """Keep timed choices in this file (None: in none) inside the block, whatever GENREC_TUNING_CACHE says;
    with an injected timer too (tests)."""
    global _store_path, _store_resolved, _store, _store_explicit
    before = (_store_path, _store_resolved, _store, _store_explicit)
    _store_path, _store_resolved, _store, _store_explicit = (None if path is None else Path(path)), True, None, True
    try:
        yield
    finally:
        _store_path, _store_resolved, _store, _store_explicit = before


def tuning_cache_path() -> Path | None:
    """GENREC_TUNING_CACHE, else genrec/tuning.json in Inductor's cache folder; None when it is "off"/"0"."""
    global _store_path, _store_resolved
    if not _store_resolved:
        value = os.environ.get("GENREC_TUNING_CACHE", "")
        if value.lower() in ("off", "0", "none", "false"):
            _store_path = None
        elif value:
            _store_path = Path(value)
        else:
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            _store_path = Path(cache_dir()) / "genrec" / "tuning.json"
        _store_resolved = True
    return _store_path


@functools.lru_cache(maxsize=None)
def _host_fingerprint(device: torch.device) -> str:
    """What a kept choice is valid for: the device model, torch and triton, and our kernels' source."""
    parts = [torch.__version__, device.type]
    if device.type == "cuda":
        parts += [torch.cuda.get_device_name(device), str(torch.cuda.get_device_capability(device))]
    try:
        import triton

        parts.append(triton.__version__)
    except ImportError:
        parts.append("no-triton")
    digest = hashlib.blake2b(digest_size=12)
    here = Path(__file__).resolve().parent
    for source in sorted([*here.glob("*.py"), here.parent / "export" / "inductor.py"]):
        if source.exists():
            digest.update(source.name.encode() + source.read_bytes())
    parts.append(digest.hexdigest())
    return "|".join(parts)


def _entry_key(op: str, key: tuple, graphed_: bool) -> str:
    return f"{op}|{key!r}|{graphed_}"


def _load_store(device: torch.device) -> dict[str, dict]:
    """This host's kept choices (empty when there are none, the file is unreadable, or it is off)."""
    global _store
    if _store is None:
        _store = {}
        path = tuning_cache_path()
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
                _store = dict(data.get(_host_fingerprint(device), {}))
            except (OSError, ValueError, AttributeError) as err:
                log.warning("tuning cache %s unreadable (%s): tuning afresh", path, err)
    return _store


def _keep(device: torch.device, op: str, key: tuple, chosen: Choice, label: str) -> None:
    """Add one timed choice to the tuning cache file (read, merge, replace: concurrent writers lose at most
    each other's latest entries, never the file)."""
    path = tuning_cache_path()
    if path is None:
        return
    entry = {"label": label, "ms": chosen.ms, "reference_ms": chosen.reference_ms, "timed": chosen.timed}
    _load_store(device)[_entry_key(op, key, chosen.graphed)] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data.setdefault(_host_fingerprint(device), {})[_entry_key(op, key, chosen.graphed)] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not write the tuning cache %s: %s", path, err)


def _kept(device: torch.device, op: str, key: tuple, reference: Option, options: Sequence[Option]) -> Choice | None:
    """The kept choice for (op, key) as a Choice, if the tuning cache has one whose option still exists."""
    entry = _load_store(device).get(_entry_key(op, key, _graphed))
    if entry is None:
        return None
    for option in [reference, *options]:
        if option.label == entry.get("label"):
            return Choice(op, key, _graphed, option.algorithm, option.config, option.exact, float(entry["ms"]),
                          float(entry["reference_ms"]), int(entry.get("timed", 0)), "cache")
    return None


@contextmanager
def timed_by(timer: Timer) -> Iterator[None]:
    """Tune with this timer, on any device (tests: deterministic timings)."""
    global _timer
    before, _timer = _timer, timer
    try:
        yield
    finally:
        _timer = before


def tunes_on(device: torch.device) -> bool:
    """Whether options are timed here: with an injected timer, or on CUDA unless GENREC_AUTOTUNE=0."""
    if _timer is not None:
        return True
    return device.type == "cuda" and os.environ.get("GENREC_AUTOTUNE", "1") != "0"


def batch_bucket(batch: int) -> int:
    """Batch sizes share a choice within powers of two: 1, 2, 3-4, 5-8, ..."""
    return 1 << max(0, (batch - 1).bit_length())


def budget_s() -> float:
    """Seconds of tuning per shape (GENREC_TUNE_BUDGET_S, default 30): after it, the options not yet timed
    (each a Triton compile the first time) are skipped. The reference and the default option always run."""
    return float(os.environ.get("GENREC_TUNE_BUDGET_S", "30"))


def choose(op: str, key: tuple, device: torch.device, reference: Option, options: Sequence[Option],
           penalty: Callable[[Option, float], float] | None = None, timer: Timer | None = None,
           rounds: int = 1, margin: float = 0.0) -> Choice:
    """The option to run for (op, key): cached; else, where tuning runs (tunes_on), the reference and then
    `options` in order (the first is the default) are timed, and the cheapest wins (the reference on a tie).
    penalty(option, reference ms) -> extra ms, e.g. the exactness check's recomputation when the option
    left rows unsure. An option that fails (out of shared memory, say) is not a candidate.
    timer: how to time the options (default: as the calls are served, see served_by_graph); an injected
    timer (timed_by) takes precedence. Where nothing is timed, or inside a CUDA-graph capture (not recorded
    then), options[0] runs untimed.
    rounds: how many times each option is timed, round-robin; each option's timings (one figure per round, or
    the per-call samples a timer may return as an array) are pooled and their median ranks it. Rounds, since a
    first timing can carry one-off costs that later calls never pay (Inductor's CUDA graphs record at a
    shape's second call); the median of the pool, not the fastest round, since one lucky round is not how an
    option serves (on the H200 a whole call under Inductor's CUDA graphs timed 0.34 ms in its best round of
    ten calls against 0.36 ms for the reference, then served at 0.53 against 0.31 ms).
    margin: an option must beat the reference by this fraction to be picked (timings of two near-equal calls
    are noise; the reference keeps such a shape)."""
    cached = choice(op, key)
    if cached is not None:
        return cached
    default = options[0]
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing or not tunes_on(device):
        untimed = Choice(op, key, _graphed, default.algorithm, default.config, default.exact, math.nan, math.nan, 0,
                         "untimed")
        if not capturing:
            _choices[(op, key, _graphed)] = untimed
        return untimed
    persist = _timer is None or _store_explicit
    kept = _kept(device, op, key, reference, options) if persist else None
    if kept is not None:
        _choices[(op, key, _graphed)] = kept
        log.info("%s %s%s -> %s (tuning cache: %.4f ms; reference %.4f ms)", op, key,
                 " (CUDA graph)" if _graphed else "", kept.algorithm if kept.config is None else
                 f"{kept.algorithm} {kept.config}", kept.ms, kept.reference_ms)
        return kept
    timer = _timer or timer or (graph_replay_ms if _graphed else launch_ms)
    start, limit = time.perf_counter(), budget_s()
    reference_runs = [_time(op, key, reference, timer)]
    runs: dict[int, list] = {}
    for i, option in enumerate(options):
        if i > 0 and time.perf_counter() - start > limit:
            log.info("%s %s: tuning budget of %.0f s spent; %d options untimed", op, key, limit, len(options) - i)
            break
        runs[i] = [_time(op, key, option, timer)]
    for _ in range(rounds - 1):
        reference_runs.append(_time(op, key, reference, timer))
        for i, timed in runs.items():
            if _finite(timed[0]):
                timed.append(_time(op, key, options[i], timer))
    reference_ms = _pooled_median(reference_runs)
    timings = {i: _pooled_median(timed) for i, timed in runs.items()}
    TUNING_LOG.append((op, key, reference.algorithm, reference.config, reference_ms, 0.0))
    costs: dict[int, float] = {}
    for i, ms in timings.items():
        option = options[i]
        extra = penalty(option, reference_ms) if penalty is not None and math.isfinite(ms) else 0.0
        TUNING_LOG.append((op, key, option.algorithm, option.config, ms if math.isfinite(ms) else math.nan, extra))
        costs[i] = ms + extra
    best = min(costs, key=costs.get, default=0)
    picked, ms = (options[best], costs[best]) if costs and costs[best] < reference_ms * (1 - margin) else (reference, reference_ms)
    chosen = Choice(op, key, _graphed, picked.algorithm, picked.config, picked.exact, ms, reference_ms,
                    len(costs) + 1)
    _choices[(op, key, _graphed)] = chosen
    if persist:
        _keep(device, op, key, chosen, picked.label)
    # Both sides of the verdict: when the reference stays, the fastest of ours that lost to it.
    other = f"reference {reference_ms:.4f} ms" if picked is not reference else \
        f"fastest other {options[best].label} {costs[best]:.4f} ms" if costs else "no other option"
    log.info("%s %s%s -> %s (%.4f ms; %s; %d options timed)", op, key, " (CUDA graph)" if _graphed else "",
             picked.label, ms, other, chosen.timed)
    return chosen


def _finite(timed) -> bool:
    return bool(np.all(np.isfinite(timed)))


def _pooled_median(runs: list) -> float:
    """The median of every timing in `runs` (floats, or arrays of per-call samples); inf if a run failed."""
    if not all(_finite(timed) for timed in runs):
        return math.inf
    return float(np.median(np.concatenate([np.atleast_1d(np.asarray(timed, dtype=float)) for timed in runs])))


def _time(op: str, key: tuple, option: Option, timer: Timer):
    """ms per call of option (a float, or per-call samples); inf where it fails (e.g. out of shared memory for
    this GPU: not a candidate)."""
    try:
        return timer(option.label, option.run)
    except Exception as err:
        log.info("%s %s: %s failed, not a candidate: %s", op, key, option.label, err)
        return math.inf


def graph_replay_ms(label: str, fn: Callable[[], object], reps: int = 5) -> float:
    """ms per call of fn on the GPU. Replayed from a CUDA graph where fn captures, as the served (captured)
    variants run it: timed from the host, a batch-1 call of a few microseconds' kernels measures its
    launches (the H200's tuner once picked a merge that took 120 us of GPU time at b=1 over torch.topk's 43)."""
    fn()  # compile
    torch.cuda.synchronize()
    call = fn
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        call = graph.replay
    except Exception:  # not capturable here: time the launches too
        torch.cuda.synchronize()
    call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def launch_ms(label: str, fn: Callable[[], object], reps: int = 20) -> float:
    """ms per call of fn launched op by op, from the host: the launches and the GPU work overlap as they do
    in a stream of calls, so this is the slower of the two."""
    fn()  # compile
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / reps
