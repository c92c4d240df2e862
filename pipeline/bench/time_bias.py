"""HR@10 / NDCG@10 of HSTU with and without its time bias on an interaction log with timestamps, over seeds:
the train stage's own code (pipeline.stages.train.fit), one model per (seed, time_bias), on this host.

    python -m pipeline.bench.time_bias --seeds 0,1,2 data.path=ml-100k.csv train.epochs=20

`key=value` arguments override the pipeline's config (data=interactions is set here). Prints a markdown
table of the test metrics per run and their means; nothing is logged to MLflow.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

METRICS = ("hr10", "ndcg10", "hr50", "ndcg50")


def main(argv: list[str] | None = None) -> None:
    from pipeline.serving.config import load_config
    from pipeline.stages.train import fit

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated, e.g. 0,1,2")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.path=log.csv train.epochs=20")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for time_bias in (False, True):
            for seed in [int(s) for s in args.seeds.split(",")]:
                cfg = load_config(["data=interactions", *args.overrides, f"seed={seed}",
                                   f"model.time_bias={str(time_bias).lower()}"])
                torch.manual_seed(seed)
                start = time.perf_counter()
                _, metrics = fit(cfg, torch.device("cpu"), Path(out), lambda *a, **k: None)
                rows.append((time_bias, seed, metrics, time.perf_counter() - start))
                print(f"time_bias={time_bias} seed={seed}: " + ", ".join(f"{m}={metrics[m]:.4f}" for m in METRICS)
                      + f", best epoch {metrics['best_epoch']}, {time.perf_counter() - start:.0f} s", flush=True)
    print("\n| time bias | seed | " + " | ".join(METRICS) + " | best epoch | seconds |")
    print("| --- | --- | " + " | ".join("---" for _ in METRICS) + " | --- | --- |")
    for time_bias, seed, metrics, seconds in rows:
        print(f"| {'on' if time_bias else 'off'} | {seed} | " + " | ".join(f"{metrics[m]:.4f}" for m in METRICS)
              + f" | {metrics['best_epoch']} | {seconds:.0f} |")
    for time_bias in (False, True):
        runs = [m for tb, _, m, _ in rows if tb == time_bias]
        means = [statistics.mean(r[m] for r in runs) for m in METRICS]
        sds = [statistics.stdev(r[m] for r in runs) if len(runs) > 1 else 0.0 for m in METRICS]
        print(f"| {'on' if time_bias else 'off'} | mean (sd) | "
              + " | ".join(f"{mean:.4f} ({sd:.4f})" for mean, sd in zip(means, sds)) + " | | |")


if __name__ == "__main__":
    main()
