"""Quality of the fast variants on real data: HR@10, NDCG@10 and HR@50 of each catalogue variant over the
test users of a trained model, beside fp32 eager on the same device, with the HR@10 difference, the top-K
overlap and the largest score error, and whether it passes the pipeline's gate of its precision (conf/gates,
pipeline.gates).

    python -m pipeline.bench.quality --checkpoint artifacts/runs/<run>/model.pt data.root=../shared/data
    python -m pipeline.bench.quality --train model=hstu data=ml-1m data.root=../shared/data --out DIR

Settings are the pipeline's Hydra config (conf/quality/default.yaml, and the model/data/train/validate
groups): `key=value` arguments override it as they do for `python -m pipeline`. --checkpoint evaluates a
model the train stage made (the data config saved with it is read, `data.*` overrides on top); --train
first trains one here with the train stage's own code (pipeline.stages.train.fit: model=hstu data=ml-1m
brings conf/tuned/hstu_ml-1m.yaml, the published protocol) and saves it in --out. The variants are
catalogue names (pipeline/catalogue.py) built around the trained retriever by catalogue.build, as the
pipeline builds them. Writes quality.csv and quality.md, and logs them with each variant's metrics to MLflow
(experiment quality.experiment_name; --no-mlflow without it).
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

import torch

from pipeline import ARTIFACTS
from pipeline.bench.parity import head
from pipeline.catalogue import DTYPES, VariantSpec, build
from pipeline.checkpoint import load_checkpoint
from pipeline.core import PipelineError
from pipeline.data import DataError, DatasetNotFoundError, leave_one_out, load_interactions
from pipeline.evaluation import parity, predict_top_k, top_k_metrics
from pipeline.gates import check, gate_for
from pipeline.models import Retriever

log = logging.getLogger("pipeline.bench.quality")

REFERENCE = VariantSpec("eager", "fp32")
COLUMNS = ("variant", "hr10", "ndcg10", "hr50", "hr10_delta", "topk_overlap", "max_abs_err", "passes", "gate_reason",
           "seconds")


def load_quality_config(overrides: list[str]):
    """The pipeline's config with the quality group; a bad override is a PipelineError."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.serving.config import load_config

    try:
        return load_config(["+quality=default", *overrides])
    except (HydraException, OmegaConfBaseException) as err:
        raise PipelineError(f"bad config override: {err}") from None


def variant_specs(names, device: torch.device) -> list[VariantSpec]:
    """The reference first, then the named catalogue variants (eager and inductor: built around the model)."""
    specs = [VariantSpec.parse(name) if isinstance(name, str) else VariantSpec.from_entry(name) for name in names]
    for spec in specs:
        if spec.backend not in ("eager", "inductor"):
            raise PipelineError(f"{spec.name}: quality builds eager and inductor variants around the checkpoint's "
                                f"model; a {spec.backend} variant is measured by the pipeline's validate stage")
    return [REFERENCE, *(s for s in dict.fromkeys(specs) if s != REFERENCE)]


def train_model(cfg, out: Path, device: torch.device) -> Path:
    """The train stage's fit on the composed config -> the checkpoint in out."""
    from pipeline.stages.train import fit

    torch.manual_seed(cfg.seed)
    checkpoint, metrics = fit(cfg, device, out, lambda metrics, step=None: None)
    log.info("trained: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    return checkpoint


def _checkpoint_data(saved: dict, overrides: list[str]):
    """The data a checkpoint was trained on: its saved data config over the defaults of its dataset, with the
    command line's data.* overrides on top (e.g. where the dataset sits on this host). data=<name> names
    another dataset (the item-count check then decides)."""
    from omegaconf import OmegaConf

    named = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "data"]
    name = named[-1] if named else saved.get("name")
    if name is None:
        raise PipelineError("the checkpoint does not say which dataset it was trained on; pass data=<name>")
    dotted = [o for o in overrides if o.startswith("data.")]
    data = load_quality_config([f"data={name}", *dotted]).data
    if name == saved.get("name"):  # the saved config (e.g. the synthetic options it was generated with)
        OmegaConf.set_struct(data, False)
        data = OmegaConf.merge(data, saved, OmegaConf.from_dotlist([o[len("data."):] for o in dotted]))
    return data


def evaluate(checkpoint: Path, cfg, specs: list[VariantSpec], users: int | None, device: torch.device,
             overrides: list[str]) -> list[dict]:
    """Every variant over the test users -> one row each; a variant that raises gets a row with its error."""
    model, payload = load_checkpoint(checkpoint)  # refuses a missing, corrupt or mismatched one before any work
    data = _checkpoint_data(dict(payload.get("extra", {}).get("data") or {}), overrides)
    splits = leave_one_out(load_interactions(data), payload["model_config"]["max_len"])
    if splits.num_items != payload["num_items"]:
        raise PipelineError(f"{checkpoint} has {payload['num_items']} items, dataset {data.name} has "
                            f"{splits.num_items}: not the data it was trained on")
    test = splits.test if users is None else head(splits.test, users)
    k = min(cfg.validate.top_k, splits.num_items)
    l2_norm = bool(payload["model_config"].get("l2_norm", True))

    rows, reference = [], None
    for spec in specs:
        torch._dynamo.reset()
        start = time.perf_counter()
        try:
            retriever = Retriever(copy.deepcopy(model), k=k, l2_norm=l2_norm)  # each variant casts its own copy
            predict = build(spec, retriever.to(device=device, dtype=DTYPES[spec.precision]).eval(), device)
            ids, scores = predict_top_k(predict, test, cfg.validate.eval_batch_size, device, desc=spec.name)
        except Exception as err:  # reported, and the other variants still run
            log.error("quality: %s failed:\n%s", spec.name, traceback.format_exc())
            if spec == REFERENCE:
                raise
            rows.append({"variant": spec.name, "error": f"{type(err).__name__}: {err}"})
            continue
        metrics = top_k_metrics(ids, test.target, ks=(10, 50))
        row = {"variant": spec.name, "hr10": metrics["hr10"], "ndcg10": metrics["ndcg10"],
               "hr50": metrics.get("hr50", float("nan")), "seconds": time.perf_counter() - start}
        if reference is None:
            reference = (ids, scores.float(), metrics["hr10"])
            row.update(hr10_delta=0.0, topk_overlap=1.0, max_abs_err=0.0, passes="reference")
        else:
            agreement = parity(ids, scores.float(), reference[0], reference[1])
            row.update(hr10_delta=metrics["hr10"] - reference[2], topk_overlap=agreement["parity_topk_overlap"],
                       max_abs_err=agreement["parity_max_abs_err"])
            passed, row["gate_reason"] = check({"hr10_delta": row["hr10_delta"], **agreement},
                                               gate_for(cfg.gates, spec.precision))
            row["passes"] = "yes" if passed else "no"
        log.info("quality: %s %s", spec.name, {c: row.get(c) for c in COLUMNS[1:]})
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
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data=ml-1m data.root=DIR train.epochs=5")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a model.pt of the train stage")
    source.add_argument("--train", action="store_true", help="train the configured model here first")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="catalogue names (default: quality.variants for the device)")
    parser.add_argument("--out", type=Path, default=ARTIFACTS / "quality")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow (a host without mlflow)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        cfg = load_quality_config(args.overrides)
        if cfg.validate.top_k < 1 or cfg.validate.eval_batch_size < 1 or (cfg.quality.users is not None
                                                                          and cfg.quality.users < 1):
            raise PipelineError("validate.top_k, validate.eval_batch_size and quality.users must be positive")
        specs = variant_specs(args.variants or list(cfg.quality.variants[device.type]), device)
        return _run(cfg, specs, args, device)
    except (PipelineError, DatasetNotFoundError, DataError) as err:  # a bad name, a missing or corrupt checkpoint or dataset
        print(f"quality: {err}", file=sys.stderr)
        return 2


def _run(cfg, specs: list[VariantSpec], args: argparse.Namespace, device: torch.device) -> int:
    if device.type == "cuda":
        # The fp32 reference in true fp32, as the bench and the compile stage's parity take it.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = train_model(cfg, args.out, device) if args.train else args.checkpoint
    users, k = cfg.quality.users, cfg.validate.top_k
    rows = evaluate(checkpoint, cfg, specs, users, device, args.overrides)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    facts = (f"Checkpoint {checkpoint}; {users or 'all'} test users; top-{k}; {gpu}, torch "
             f"{torch.__version__}; the pipeline's gates (gates.<precision>: max_hr10_drop, min_topk_overlap, "
             "max_score_err).")
    with open(args.out / "quality.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "error"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    text = table(rows, facts, k)
    (args.out / "quality.md").write_text(text)
    print(text)
    if not args.no_mlflow:
        _log_mlflow(cfg, args, checkpoint, rows, device, [args.out / "quality.csv", args.out / "quality.md"])
    return 1 if any("error" in row for row in rows) else 0


def _log_mlflow(cfg, args, checkpoint: Path, rows: list[dict], device: torch.device, artifacts: list[Path]) -> None:
    """Experiment quality.experiment_name: a run per invocation, a nested run per variant with its metrics."""
    try:
        from omegaconf import OmegaConf

        from pipeline.tracking import Tracker, host_tags

        uri = cfg.mlflow.tracking_uri
        # A sqlite store keeps its artifacts beside it (the default one: <artifacts_dir>/mlruns).
        store = Path(uri.removeprefix("sqlite:///")).parent if uri and uri.startswith("sqlite:///") else Path(cfg.artifacts_dir)
        tracker = Tracker(OmegaConf.create({"tracking_uri": uri, "experiment_name": cfg.quality.experiment_name}), store)
        with tracker.run(f"quality:{checkpoint.parent.name}/{checkpoint.name}", tags=host_tags(device), nested=False):
            tracker.log_params({"checkpoint": str(checkpoint), "users": cfg.quality.users or "all", "k": cfg.validate.top_k,
                                "gates": str(OmegaConf.to_container(cfg.gates, resolve=True))[:500]})
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
