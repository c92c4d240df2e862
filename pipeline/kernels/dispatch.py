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
"""
from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import torch

log = logging.getLogger(__name__)

REFERENCE = "reference"
# A timer: (label of the candidate, a call of it) -> ms per call.
Timer = Callable[[str, Callable[[], object]], float]


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


_choices: dict[tuple[str, tuple, bool], Choice] = {}
# Every timing taken: (op, key, algorithm, config, ms per call (nan: the option failed), penalty ms added).
TUNING_LOG: list[tuple[str, tuple, str, object, float, float]] = []
_timer: Timer | None = None
_graphed = False


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
    """Forget every choice (tests; a bench that wants fresh tuning)."""
    _choices.clear()
    TUNING_LOG.clear()


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
           rounds: int = 1) -> Choice:
    """The option to run for (op, key): cached; else, where tuning runs (tunes_on), the reference and then
    `options` in order (the first is the default) are timed, and the cheapest wins (the reference on a tie).
    penalty(option, reference ms) -> extra ms, e.g. the exactness check's recomputation when the option
    left rows unsure. An option that fails (out of shared memory, say) is not a candidate.
    timer: how to time the options (default: as the calls are served, see served_by_graph); an injected
    timer (timed_by) takes precedence. Where nothing is timed, or inside a CUDA-graph capture (not recorded
    then), options[0] runs untimed.
    rounds: how many times each option is timed, round-robin, keeping its fastest: a first timing can carry
    one-off costs that later calls never pay (Inductor's CUDA graphs record at a shape's second call)."""
    cached = choice(op, key)
    if cached is not None:
        return cached
    default = options[0]
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing or not tunes_on(device):
        untimed = Choice(op, key, _graphed, default.algorithm, default.config, default.exact, math.nan, math.nan, 0)
        if not capturing:
            _choices[(op, key, _graphed)] = untimed
        return untimed
    timer = _timer or timer or (graph_replay_ms if _graphed else launch_ms)
    start, limit = time.perf_counter(), budget_s()
    reference_ms = _time(op, key, reference, timer)
    timings: dict[int, float] = {}
    for i, option in enumerate(options):
        if i > 0 and time.perf_counter() - start > limit:
            log.info("%s %s: tuning budget of %.0f s spent; %d options untimed", op, key, limit, len(options) - i)
            break
        timings[i] = _time(op, key, option, timer)
    for _ in range(rounds - 1):
        reference_ms = min(reference_ms, _time(op, key, reference, timer))
        for i, ms in timings.items():
            if math.isfinite(ms):
                timings[i] = min(ms, _time(op, key, options[i], timer))
    TUNING_LOG.append((op, key, reference.algorithm, reference.config, reference_ms, 0.0))
    costs: dict[int, float] = {}
    for i, ms in timings.items():
        option = options[i]
        extra = penalty(option, reference_ms) if penalty is not None and math.isfinite(ms) else 0.0
        TUNING_LOG.append((op, key, option.algorithm, option.config, ms if math.isfinite(ms) else math.nan, extra))
        costs[i] = ms + extra
    best = min(costs, key=costs.get, default=0)
    picked, ms = (options[best], costs[best]) if costs and costs[best] < reference_ms else (reference, reference_ms)
    chosen = Choice(op, key, _graphed, picked.algorithm, picked.config, picked.exact, ms, reference_ms,
                    len(costs) + 1)
    _choices[(op, key, _graphed)] = chosen
    log.info("%s %s%s -> %s (%.4f ms; reference %.4f ms; %d options timed)", op, key,
             " (CUDA graph)" if _graphed else "", picked.label, ms, reference_ms, chosen.timed)
    return chosen


def _time(op: str, key: tuple, option: Option, timer: Timer) -> float:
    """ms per call of option; inf where it fails (e.g. out of shared memory for this GPU: not a candidate)."""
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
