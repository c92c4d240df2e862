"""How fast and how big reading a user's interaction log is: a benchmark, not a test.

    python -m pipeline.bench.interactions --rows 10000000

Writes a synthetic CSV (user,item,timestamp; integer ids, Zipf item popularity, 1 to 3 exact duplicates
per thousand rows) to a temporary folder, then, in a fresh process so that the generator's memory is not
counted, reads it with data=interactions' reader (drop_duplicates, a 5-core filter), and makes the
leave-one-out splits (history 200). Prints seconds per step and the peak resident memory of that process
(getrusage's ru_maxrss, and a thread sampling /proc/self/statm every 10 ms).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def write_log(path: Path, rows: int, users: int, items: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.csv as csv

    rng = np.random.default_rng(seed)
    chunk = 2_000_000
    with csv.CSVWriter(str(path), pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()),
                                             ("timestamp", pa.int64())])) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            user = rng.integers(1, users + 1, size=n)
            item = np.minimum(rng.zipf(1.2, size=n), items)
            stamp = 1_600_000_000 + rng.integers(0, 365 * 86_400, size=n)
            dup = rng.random(n) < 0.002  # copy the row before: an exact duplicate
            dup[0] = False
            idx = np.arange(n) - dup
            writer.write_table(pa.table({"user_id": user[idx], "item_id": item[idx], "timestamp": stamp[idx]}))


def _peak_sampler(stop: threading.Event, peak: list[int]) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    while not stop.is_set():
        with open("/proc/self/statm") as f:
            peak[0] = max(peak[0], int(f.read().split()[1]) * page)
        stop.wait(0.01)


def measure(path: Path, max_len: int, min_core: int) -> dict:
    """Read + filter + split in this process -> seconds and peak memory."""
    from pipeline.data import leave_one_out
    from pipeline.data.interactions import TableSpec, read_interactions

    peak, stop = [0], threading.Event()
    sampler = threading.Thread(target=_peak_sampler, args=(stop, peak), daemon=True)
    sampler.start()
    start = time.perf_counter()
    interactions = read_interactions(TableSpec(path=str(path)), "bench", drop_duplicates=True,
                                     min_user_interactions=min_core, min_item_interactions=min_core)
    read_s = time.perf_counter() - start
    splits = leave_one_out(interactions, max_len)
    total_s = time.perf_counter() - start
    stop.set()
    sampler.join()
    return {"read_filter_s": round(read_s, 2), "split_s": round(total_s - read_s, 2), "total_s": round(total_s, 2),
            "peak_rss_gib_sampled": round(peak[0] / 2**30, 3),
            "peak_rss_gib_getrusage": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "report": interactions.report, "train_users": int(splits.train.items.shape[0]),
            "threads": os.cpu_count()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--min-core", type=int, default=5)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the fresh process's part
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.max_len, args.min_core)))
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "log.csv"
        start = time.perf_counter()
        write_log(path, args.rows, args.users, args.items)
        print(f"wrote {args.rows:,} rows ({path.stat().st_size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        out = subprocess.run([sys.executable, "-m", "pipeline.bench.interactions", "--measure", str(path),
                              "--max-len", str(args.max_len), "--min-core", str(args.min_core)],
                             check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
