"""One gate definition: the gate of each precision from conf/gates, the one check, and the per-stage gate
keys that no longer exist refused as config errors."""
import math
import re

import pytest
from hydra.errors import ConfigCompositionException

from pipeline.core import PipelineError
from pipeline.gates import Gate, check, gate_for, load_gates
from pipeline.serving.config import load_config

GOOD = {"hr10_delta": 0.0, "parity_topk_overlap": 1.0, "parity_max_abs_err": 0.0}


def test_every_precision_has_a_gate_in_the_config_and_the_yaml_reads_alike():
    cfg = load_config([])
    for precision in ("fp32", "fp16", "bf16", "int8"):
        assert gate_for(cfg.gates, precision) == gate_for(load_gates(), precision)
    assert gate_for(cfg.gates, "int8") == Gate("int8", max_hr10_drop=0.005, min_topk_overlap=0.97)
    assert gate_for(cfg.gates, "fp32").max_score_err == 1e-3


def test_check_names_each_failing_part_and_its_key():
    gate = Gate("fp16", max_hr10_drop=0.01, min_topk_overlap=0.99, max_score_err=0.1)
    assert check(GOOD, gate) == (True, "passed")
    passed, why = check({"hr10_delta": -0.02, "parity_topk_overlap": 0.9, "parity_max_abs_err": 0.5}, gate)
    assert not passed
    assert "HR@10 -0.0200 vs eager-fp32 (allowed drop 0.01, gates.fp16.max_hr10_drop)" in why
    assert "top-K overlap 0.9000 < 0.99 (gates.fp16.min_topk_overlap)" in why
    assert "score error 0.5 > 0.1 (gates.fp16.max_score_err)" in why
    # exactly at the limits passes
    assert check({"hr10_delta": -0.01, "parity_topk_overlap": 0.99, "parity_max_abs_err": 0.1}, gate)[0]


def test_nan_never_passes():
    gate = Gate("fp32", max_hr10_drop=0.01, min_topk_overlap=0.99, max_score_err=1e-3)
    for key in GOOD:
        passed, why = check({**GOOD, key: math.nan}, gate)
        assert not passed, key


def test_parity_only_leaves_quality_out_and_none_is_not_gated():
    gate = Gate("bf16", max_hr10_drop=0.01, min_topk_overlap=0.99)
    sample = {"parity_topk_overlap": 0.995, "parity_max_abs_err": 123.0}  # no HR@10 on a sample
    assert check(sample, gate.parity_only()) == (True, "passed")
    with pytest.raises(KeyError):
        check(sample, gate)


def test_an_override_of_a_gate_reaches_it():
    cfg = load_config(["gates.fp16.min_topk_overlap=0.5", "gates.fp32.max_score_err=null"])
    assert gate_for(cfg.gates, "fp16").min_topk_overlap == 0.5
    assert gate_for(cfg.gates, "fp32").max_score_err is None


@pytest.mark.parametrize("override", [
    "validate.gates.max_hr10_drop=0.1",
    "validate.gates.per_precision.int8.min_topk_overlap=0.9",
    "compile.parity.min_topk_overlap.fp16=0.5",
    "onnx.parity.max_abs_err.fp32=1",
    "trt.parity.num_users=8",
    "int8.parity.batch_size=8",
])
def test_the_per_stage_gate_keys_are_gone(override):
    with pytest.raises(ConfigCompositionException, match=re.escape(f"Could not override '{override.split('=')[0]}'")):
        load_config([override])


def test_unknown_gate_parts_and_precisions_are_refused():
    with pytest.raises(PipelineError, match=r"unknown key\(s\) gates.fp16.max_overlap; valid: max_hr10_drop"):
        gate_for({"fp16": {"max_overlap": 0.9}}, "fp16")
    with pytest.raises(PipelineError, match="no gate for precision 'fp8'"):
        gate_for(load_gates(), "fp8")
