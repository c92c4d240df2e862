"""One meaning of "passes": a gate per precision (conf/gates) and the one check every stage and tool applies.

A variant passes when its test HR@10 is at most max_hr10_drop below eager-fp32's, its top-K overlaps
eager-fp32's by at least min_topk_overlap, and no top-K score differs from eager-fp32's by more than
max_score_err (None: that part is not gated). Quick checks on a sample of users gate only the overlap and
the score error (Gate.parity_only): HR@10 on a few hundred users says little. No omegaconf here: the bench
and the quality tool read conf/gates/default.yaml on hosts without it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from pipeline import PROJECT_ROOT
from pipeline.core import PRECISIONS, PipelineError

GATES_FILE = PROJECT_ROOT / "conf" / "gates" / "default.yaml"
PARTS = ("max_hr10_drop", "min_topk_overlap", "max_score_err")
REFERENCE = "eager-fp32"


@dataclass(frozen=True)
class Gate:
    precision: str                    # the gates.<precision> section it comes from, named in every reason
    max_hr10_drop: float | None = None
    min_topk_overlap: float | None = None
    max_score_err: float | None = None

    def parity_only(self) -> "Gate":
        """The parts a sample of users can judge: overlap and score error."""
        return replace(self, max_hr10_drop=None)

    def as_metrics(self) -> dict[str, float]:
        """gate_max_hr10_drop, ... for the parts that are gated (logged beside the variant's metrics)."""
        return {f"gate_{part}": value for part in PARTS if (value := getattr(self, part)) is not None}


def gate_for(gates: Mapping[str, Any], precision: str) -> Gate:
    """The gate of a precision from the gates section (the config's `gates`, or load_gates())."""
    if precision not in PRECISIONS:
        raise PipelineError(f"no gate for precision '{precision}'; valid: {', '.join(PRECISIONS)}")
    section = gates.get(precision)
    if section is None:
        raise PipelineError(f"gates.{precision} is missing; it needs {', '.join(PARTS)}")
    unknown = sorted(set(section) - set(PARTS))
    if unknown:
        raise PipelineError(f"unknown key(s) gates.{precision}.{', '.join(unknown)}; valid: {', '.join(PARTS)}")
    values = {part: None if section.get(part) is None else float(section[part]) for part in PARTS}
    return Gate(precision, **values)


def check(metrics: Mapping[str, float], gate: Gate) -> tuple[bool, str]:
    """-> (passed, why). metrics: hr10_delta, parity_topk_overlap, parity_max_abs_err against eager-fp32,
    as pipeline.evaluation.parity names them (each one its gate needs). NaN never passes."""
    failed = []
    if gate.max_hr10_drop is not None and not metrics["hr10_delta"] >= -gate.max_hr10_drop:
        failed.append(f"HR@10 {metrics['hr10_delta']:+.4f} vs {REFERENCE} "
                      f"(allowed drop {gate.max_hr10_drop}, gates.{gate.precision}.max_hr10_drop)")
    if gate.min_topk_overlap is not None and not metrics["parity_topk_overlap"] >= gate.min_topk_overlap:
        failed.append(f"top-K overlap {metrics['parity_topk_overlap']:.4f} < {gate.min_topk_overlap} "
                      f"(gates.{gate.precision}.min_topk_overlap)")
    if gate.max_score_err is not None and not metrics["parity_max_abs_err"] <= gate.max_score_err:
        failed.append(f"score error {metrics['parity_max_abs_err']:.3g} > {gate.max_score_err} "
                      f"(gates.{gate.precision}.max_score_err)")
    return not failed, "; ".join(failed) or "passed"


def load_gates(path: Path = GATES_FILE) -> dict[str, Any]:
    """The gates section from its YAML file, for tools that run without Hydra."""
    import yaml

    if not Path(path).is_file():
        raise PipelineError(f"gates file not found: {path}")
    return yaml.safe_load(Path(path).read_text()) or {}
