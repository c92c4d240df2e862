"""Quality of the fast variants on real data: HR@10, NDCG@10 and HR@50 of each variant over the test users
of a trained model, beside fp32 eager on the same device, with the HR@10 difference, the top-K overlap and
the largest score error, and whether it passes the pipeline's gate of its precision (conf/gates, pipeline.gates).

    python -m pipeline.bench.quality --checkpoint artifacts/runs/<run>/train/model.pt --data-root ../shared/data
    python -m pipeline.bench.quality --train --data ml-1m --data-root ../shared/data --out DIR

--checkpoint evaluates a model the train stage made (its data config comes with it); --train first trains
one here with a preset (default conf/tuned/hstu_ml-1m.yaml, the published protocol) and saves it in --out.
Needs torch (and triton for our kernels), not hydra or mlflow: it runs on a bare GPU host. The variants are
the bench's (pipeline.bench.run), wrapped around the trained retriever. Writes quality.csv and quality.md, and
logs them with each variant's metrics to MLflow (experiment genrec-quality; --no-mlflow without it).
"""
from __future__ import annotations

import argparse
import copy
import csv
import logging
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from pipeline import ARTIFACTS, PROJECT_ROOT
from pipeline.bench.parity import head
from pipeline.bench.run import DTYPES, BenchVariant, variants_for
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.core import PipelineError
from pipeline.data import (
    DATASET_NAMES,
    DataError,
    DatasetNotFoundError,
    leave_one_out,
    load_interactions,
    train_with_validation,
)
from pipeline.evaluation import parity, predict_top_k, top_k_metrics
from pipeline.gates import GATES_FILE, check, gate_for, load_gates
from pipeline.models import Retriever, build_model
from pipeline.training import train_epoch

log = logging.getLogger("pipeline.bench.quality")

REFERENCE = "eager-fp32"
COLUMNS = ("variant", "hr10", "ndcg10", "hr50", "hr10_delta", "topk_overlap", "max_abs_err", "passes", "gate_reason",
           "seconds")
DEFAULT_PRESET = PROJECT_ROOT / "conf" / "tuned" / "hstu_ml-1m.yaml"


def default_variants(device: torch.device) -> list[str]:
    """The reference, our headline variants and the best baselines: whole calls, not parts."""
    names = [v.name for v in variants_for(device) if v.part is None]
    if device.type == "cuda":
        keep = (REFERENCE, "triton-compile-max-autotune-graph-bf16", "triton-compile-max-autotune-graph-fp16",
                "compile-max-autotune-bf16", "eager-bf16")
        return [n for n in keep if n in names]
    return names


def _preset(path: Path | None, epochs: int | None) -> tuple[dict, dict]:
    """-> (model config, train config): the defaults of conf/model/hstu.yaml and conf/train/default.yaml,
    with the preset's model/train keys on top."""
    conf = PROJECT_ROOT / "conf"
    model = yaml.safe_load((conf / "model" / "hstu.yaml").read_text())
    train = yaml.safe_load((conf / "train" / "default.yaml").read_text())
    if path is not None:
        if not path.is_file():
            raise SystemExit(f"quality: preset not found: {path}")
        preset = yaml.safe_load(path.read_text()) or {}
        unknown = sorted(set(preset) - {"model", "train"})
        if unknown:
            raise SystemExit(f"quality: preset {path} has keys {unknown}; only model and train are read")
        for section, base in (("model", model), ("train", train)):
            wrong = sorted(set(preset.get(section) or {}) - set(base))
            if wrong:
                raise SystemExit(f"quality: preset {path} sets unknown {section} key(s) {', '.join(wrong)}; "
                                 f"valid: {', '.join(sorted(base))}")
            base.update(preset.get(section) or {})
    if epochs is not None:
        train["epochs"] = epochs
    return model, train


def _data_cfg(name: str, root: str | None, saved: dict | None = None) -> SimpleNamespace:
    """The data config to read (never to download): a checkpoint's own (saved) unless another dataset is named."""
    saved = saved if saved and saved.get("name") == name else {}
    return SimpleNamespace(name=name, root=root or saved.get("root"), download=False,
                           min_rating=saved.get("min_rating"), synthetic=saved.get("synthetic"))


def train_model(args, device: torch.device) -> Path:
    """Trains the preset on every item but the test one (the published protocol, whatever the preset's
    train.fit), for its epochs, without early stopping -> the checkpoint."""
    model_cfg, tcfg = _preset(args.preset, args.epochs)
    splits = leave_one_out(load_interactions(_data_cfg(args.data, args.data_root)), model_cfg["max_len"])
    torch.manual_seed(args.seed)
    model = build_model(model_cfg, splits.num_items).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg["lr"], weight_decay=tcfg["weight_decay"],
                                  betas=tuple(tcfg["betas"]))
    gen = torch.Generator().manual_seed(args.seed)
    sequences = train_with_validation(splits)
    start = time.perf_counter()
    loss = float("nan")
    for epoch in range(1, tcfg["epochs"] + 1):
        loss = train_epoch(model, optimizer, sequences, batch_size=tcfg["batch_size"],
                           num_negatives=tcfg["num_negatives"], temperature=model_cfg["temperature"],
                           l2_norm=model_cfg["l2_norm"], per_position=tcfg["negatives"] == "per_position",
                           device=device, gen=gen)
        if epoch == 1 or epoch % 10 == 0 or epoch == tcfg["epochs"]:
            log.info("train epoch %d/%d: loss %.4f (%.0f s)", epoch, tcfg["epochs"], loss, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    return save_checkpoint(args.out / "model.pt", model.cpu().eval(), model_cfg, splits.num_items, extra={
        "data": {"name": args.data, "root": args.data_root},
        "metrics": {"train_seconds": seconds, "epochs_run": tcfg["epochs"], "train_loss": loss},
    })


def evaluate(checkpoint: Path, args, device: torch.device) -> list[dict]:
    """Every variant over the test users -> one row each; a variant that raises gets a row with its error."""
    model, payload = load_checkpoint(checkpoint)  # refuses a missing, corrupt or mismatched one before any work
    data = dict(payload.get("extra", {}).get("data") or {})
    name = args.data or data.get("name")
    if name is None:
        raise SystemExit(f"quality: {checkpoint} does not say which dataset it was trained on; pass --data")
    splits = leave_one_out(load_interactions(_data_cfg(name, args.data_root, data)), payload["model_config"]["max_len"])
    if splits.num_items != payload["num_items"]:
        raise SystemExit(f"quality: {checkpoint} has {payload['num_items']} items, dataset {name} has "
                         f"{splits.num_items}: not the data it was trained on")
    test = splits.test if args.users is None else head(splits.test, args.users)
    k = min(args.k, splits.num_items)
    l2_norm = bool(payload["model_config"].get("l2_norm", True))
    known = {v.name: v for v in variants_for(device) if v.part is None}
    names = args.variants or default_variants(device)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"quality: unknown variant(s) {', '.join(unknown)} on {device.type}; valid: {', '.join(known)}")
    names = [REFERENCE, *(n for n in names if n != REFERENCE)]
    gates = load_gates(args.gates)

    rows, reference = [], None
    for variant_name in names:
        variant = known[variant_name]
        torch._dynamo.reset()
        start = time.perf_counter()
        try:
            retriever = Retriever(copy.deepcopy(model), k=k, l2_norm=l2_norm)  # each variant casts its own copy
            retriever = retriever.to(device=device, dtype=DTYPES[variant.precision]).eval()
            ids, scores = predict_top_k(variant.wrap(retriever), test, args.batch_size, device, desc=variant_name)
        except Exception as err:  # reported, and the other variants still run
            log.error("quality: %s failed:\n%s", variant_name, traceback.format_exc())
            if variant_name == REFERENCE:
                raise
            rows.append({"variant": variant_name, "error": f"{type(err).__name__}: {err}"})
            continue
        metrics = top_k_metrics(ids, test.target, ks=(10, 50))
        row = {"variant": variant_name, "hr10": metrics["hr10"], "ndcg10": metrics["ndcg10"],
               "hr50": metrics.get("hr50", float("nan")), "seconds": time.perf_counter() - start}
        if reference is None:
            reference = (ids, scores.float(), metrics["hr10"])
            row.update(hr10_delta=0.0, topk_overlap=1.0, max_abs_err=0.0, passes="reference")
        else:
            agreement = parity(ids, scores.float(), reference[0], reference[1])
            row.update(hr10_delta=metrics["hr10"] - reference[2], topk_overlap=agreement["parity_topk_overlap"],
                       max_abs_err=agreement["parity_max_abs_err"])
            passed, row["gate_reason"] = check({"hr10_delta": row["hr10_delta"], **agreement},
                                               gate_for(gates, variant.precision))
            row["passes"] = "yes" if passed else "no"
        log.info("quality: %s %s", variant_name, {c: row.get(c) for c in COLUMNS[1:]})
        rows.append(row)
    return rows


def table(rows: list[dict], facts: str, k: int) -> str:
    lines = [facts, "", f"| variant | HR@10 | NDCG@10 | HR@50 | HR@10 - fp32 | top-{k} overlap with fp32 | "
             "max abs score error | passes the gates |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | failed: {row['error'][:200]} | | | | | | |")
            continue
        hr50 = "n/a" if row["hr50"] != row["hr50"] else f"{row['hr50']:.4f}"  # nan: k < 50
        lines.append(f"| {row['variant']} | {row['hr10']:.4f} | {row['ndcg10']:.4f} | {hr50} | "
                     f"{row['hr10_delta']:+.4f} | {row['topk_overlap']:.4f} | {row['max_abs_err']:.2e} | "
                     f"{row['passes'] if row['passes'] != 'no' else 'no: ' + row['gate_reason']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a model.pt of the train stage")
    source.add_argument("--train", action="store_true", help="train the --preset here first")
    parser.add_argument("--data", choices=DATASET_NAMES, default=None,
                        help="dataset (default: the checkpoint's; ml-1m with --train)")
    parser.add_argument("--data-root", default=None, help="folder holding the dataset folders (no download)")
    parser.add_argument("--preset", type=Path, default=DEFAULT_PRESET,
                        help="YAML with model:/train: keys over the defaults (with --train)")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs (with --train)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--variants", nargs="+", default=None, help="bench variant names (default: the headline ones)")
    parser.add_argument("--k", type=int, default=100, help="top-K compared (the workload's 100)")
    parser.add_argument("--users", type=int, default=None, help="first N test users (default: all)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--gates", type=Path, default=GATES_FILE,
                        help="the gates, one per precision (default: the pipeline's conf/gates/default.yaml)")
    parser.add_argument("--out", type=Path, default=ARTIFACTS / "quality")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow (a host without mlflow)")
    parser.add_argument("--tracking-uri", default=None, help="default: sqlite:///<project>/artifacts/mlflow.db")
    args = parser.parse_args(argv)
    try:
        return _run(args, parser)
    except (PipelineError, DatasetNotFoundError, DataError) as err:  # a missing or corrupt checkpoint or dataset
        print(f"quality: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.k < 1 or args.batch_size < 1 or (args.users is not None and args.users < 1):
        parser.error("--k, --batch-size and --users must be positive")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        # The fp32 reference in true fp32, as the bench and the compile stage's parity take it.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    if args.train:
        args.data = args.data or "ml-1m"
        checkpoint = train_model(args, device)
    else:
        checkpoint = args.checkpoint
    rows = evaluate(checkpoint, args, device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    facts = (f"Checkpoint {checkpoint}; {args.users or 'all'} test users; top-{args.k}; {gpu}, torch "
             f"{torch.__version__}; gates of {args.gates} (gates.<precision>: max_hr10_drop, min_topk_overlap, "
             "max_score_err).")
    with open(args.out / "quality.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "error"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    text = table(rows, facts, args.k)
    (args.out / "quality.md").write_text(text)
    print(text)
    if not args.no_mlflow:
        _log_mlflow(args, checkpoint, rows, device, [args.out / "quality.csv", args.out / "quality.md"])
    return 1 if any("error" in row for row in rows) else 0


def _log_mlflow(args, checkpoint: Path, rows: list[dict], device: torch.device, artifacts: list[Path]) -> None:
    """Experiment genrec-quality: a run per invocation, a nested run per variant with its metrics."""
    try:
        from omegaconf import OmegaConf

        from pipeline.tracking import Tracker, host_tags

        uri = args.tracking_uri
        # A sqlite store keeps its artifacts beside it (the default one: <project>/artifacts/mlruns).
        store = Path(uri.removeprefix("sqlite:///")).parent if uri and uri.startswith("sqlite:///") else ARTIFACTS
        tracker = Tracker(OmegaConf.create({"tracking_uri": uri, "experiment_name": "genrec-quality"}), store)
        with tracker.run(f"quality:{args.data or checkpoint.name}", tags=host_tags(device), nested=False):
            tracker.log_params({"checkpoint": str(checkpoint), "users": args.users or "all", "k": args.k,
                                "gates": str(args.gates)})
            for row in rows:
                with tracker.run(f"variant:{row['variant']}", tags={"variant": row["variant"]}):
                    if "error" in row:
                        tracker.set_tags({"error": row["error"][:5000]})
                        continue
                    tracker.set_tags({"passes": row["passes"], "gate_reason": row.get("gate_reason", "")})
                    tracker.log_metrics({"hr10": row["hr10"], "ndcg10": row["ndcg10"], "hr10_delta": row["hr10_delta"],
                                         "parity_topk_overlap": row["topk_overlap"],
                                         "parity_max_abs_err": row["max_abs_err"], "eval_seconds": row["seconds"],
                                         **({} if row["hr50"] != row["hr50"] else {"hr50": row["hr50"]})})
            for path in artifacts:
                tracker.log_artifact(path)
        print(f"logged to MLflow at {tracker.uri}", flush=True)
    except Exception as err:  # the results are on disk already; a missing mlflow must not lose them
        print(f"MLflow logging failed (use --no-mlflow to skip it): {type(err).__name__}: {err}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
