"""The variant catalogue: one naming rule and its inverse, specs from config entries, the manifest's
Variant named by its spec, and catalogue.build as the one way eager and inductor variants are made."""
import pytest
import torch
from omegaconf import OmegaConf

from pipeline.catalogue import VariantSpec, build
from pipeline.core import PipelineError, Variant
from pipeline.models import HSTU, Retriever
from pipeline.stages.compile import inductor_specs
from tests.conftest import ROOT

# old bench name -> (spec, new name): the names bench.md, validate's table and the registry now share.
RENAMED = {
    "compile-max-autotune-bf16": (VariantSpec("inductor", "bf16", mode="max-autotune"), "inductor-max-autotune-bf16"),
    "triton-compile-max-autotune-graph-bf16": (
        VariantSpec("inductor", "bf16", "triton", "max-autotune-no-cudagraphs", cuda_graph=True),
        "inductor-max-autotune-graph-triton-bf16"),
    "triton-compile-max-autotune-graph-bf16-inductor-ln": (
        VariantSpec("inductor", "bf16", "triton", "max-autotune-no-cudagraphs", cuda_graph=True, reference_ops=("ln_gate",)),
        "inductor-max-autotune-graph-triton-ref_ln_gate-bf16"),
    "triton-compile-max-autotune-int8table": (
        VariantSpec("inductor", "bf16", "triton", "max-autotune", int8_table=True), "inductor-max-autotune-triton-int8table-bf16"),
    "triton-eager-bf16": (VariantSpec("eager", "bf16", "triton"), "eager-triton-bf16"),
    "compile-fp32": (VariantSpec("inductor", "fp32"), "inductor-fp32"),
}


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_names_follow_the_rule_and_parse_back(old):
    spec, name = RENAMED[old]
    assert spec.name == name
    assert VariantSpec.parse(name) == spec


def test_the_graph_alias_keeps_modes_apart():
    """With "graph", max-autotune stands for max-autotune-no-cudagraphs; without it, max-autotune is itself."""
    assert VariantSpec.parse("inductor-max-autotune-graph-triton-fp16").mode == "max-autotune-no-cudagraphs"
    assert VariantSpec.parse("inductor-max-autotune-triton-fp16").mode == "max-autotune"
    assert VariantSpec.parse("inductor-max-autotune-no-cudagraphs-triton-fp16").cuda_graph is False
    assert VariantSpec.parse("inductor-graph-fp32") == VariantSpec("inductor", "fp32", cuda_graph=True)


@pytest.mark.parametrize("name, why", [
    ("inductor-fp64", "precision"),
    ("triton-compile-bf16", "backend"),
    ("inductor-triton-max-autotune-fp16", "not written by the rule|unknown part"),  # parts out of order
    ("eager-max-autotune-fp32", "only inductor"),
    ("aoti-triton-fp16", "plain PyTorch"),
    ("inductor-fp16-extra", "precision"),
    ("inductor-max-autotune-no-cudagraphs-graph-fp16", "not written by the rule"),
])
def test_names_the_rule_does_not_write_are_refused(name, why):
    with pytest.raises(PipelineError, match=why):
        VariantSpec.parse(name)


def test_cuda_graph_refuses_modes_that_capture_themselves():
    with pytest.raises(PipelineError, match="max-autotune-no-cudagraphs"):
        VariantSpec("inductor", "fp16", mode="max-autotune", cuda_graph=True)


def test_a_variant_is_named_by_its_spec():
    spec = VariantSpec("inductor", "fp16", "triton", "max-autotune-no-cudagraphs", cuda_graph=True)
    variant = spec.variant("model.pt", "compile", top_k=100)
    assert variant.name == spec.name and variant.spec == spec and variant.options["top_k"] == 100
    assert Variant(**variant.to_dict()).spec == spec  # as the manifest reloads it
    with pytest.raises(PipelineError, match="inductor-max-autotune-fp16"):
        Variant("inductor-fp16", "inductor", "fp16", "model.pt", "compile", {"mode": "max-autotune"})


def test_compile_entries_are_specs_with_the_target_precision():
    cuda = OmegaConf.load(ROOT / "conf" / "compile" / "default.yaml").inductor.cuda
    names = [s.name for s in inductor_specs(cuda, "reference", "fp16")]
    assert "inductor-max-autotune-graph-triton-fp16" in names  # the captured call, by default on CUDA
    assert "inductor-max-autotune-fp16" in names               # its plain-PyTorch twin
    entries = OmegaConf.create([{"mode": "default"}, "inductor-max-autotune-bf16", {"kernels": "triton", "precision": "fp32"}])
    assert [s.name for s in inductor_specs(entries, "reference", "fp16")] == [
        "inductor-fp16", "inductor-max-autotune-bf16", "inductor-triton-fp32"]
    with pytest.raises(PipelineError, match="unknown key.*kernel"):
        inductor_specs(OmegaConf.create([{"kernel": "triton"}]), "reference", "fp16")
    with pytest.raises(PipelineError, match="more than once"):
        inductor_specs(OmegaConf.create([{"mode": "default"}, "inductor-fp16"]), "reference", "fp16")
    with pytest.raises(PipelineError, match="inductor"):
        inductor_specs(OmegaConf.create(["eager-fp16"]), "reference", "fp16")


def _retriever():
    torch.manual_seed(0)
    return Retriever(HSTU(num_items=30, max_len=8, dim=16, num_layers=1, num_heads=2), k=5).eval()


def test_build_freezes_our_variants_not_the_eager_baseline():
    history, lengths = torch.randint(1, 31, (3, 8)), torch.tensor([8, 3, 5])
    with torch.no_grad():
        expected = _retriever()(history, lengths)
    baseline = _retriever()
    ids, _ = build(VariantSpec("eager", "fp32"), baseline, torch.device("cpu"))(history, lengths)
    assert baseline.frozen_table is None and torch.equal(ids, expected[0])  # plain PyTorch: normalized per call
    ours = _retriever()
    ids, _ = build(VariantSpec("eager", "fp32", int8_table=True), ours, torch.device("cpu"))(history, lengths)
    assert ours.frozen_table is not None and ours.frozen_table.dtype == torch.int8
    with pytest.raises(PipelineError, match="artifact"):
        build(VariantSpec("aoti", "fp32"), _retriever(), torch.device("cpu"))


def test_a_reference_spec_is_built_once_per_weights_and_serves_as_our_variants_twin(tmp_path):
    """validate loads inductor-X and inductor-X-triton from one checkpoint: where our variant's dispatch picks
    its reference twin, the twin is inductor-X's own build, so both columns time one build, not two."""
    cpu = torch.device("cpu")
    weights = (str(tmp_path / "model.pt"), 1, 2, "fp32", "cpu", 5)
    reference = build(VariantSpec("inductor", "fp32"), _retriever(), cpu, source=weights)
    assert build(VariantSpec("inductor", "fp32"), _retriever(), cpu, source=weights) is reference
    ours = build(VariantSpec("inductor", "fp32", "triton"), _retriever(), cpu, source=weights)
    assert ours is not reference and ours._reference_twin() is reference
    # other weights, another mode, or no source: builds of their own
    other = (str(tmp_path / "other.pt"), *weights[1:])
    assert build(VariantSpec("inductor", "fp32"), _retriever(), cpu, source=other) is not reference
    assert build(VariantSpec("inductor", "fp32", mode="max-autotune-no-cudagraphs"), _retriever(), cpu,
                 source=weights) is not reference
    assert build(VariantSpec("inductor", "fp32"), _retriever(), cpu) is not reference
    alone = build(VariantSpec("inductor", "fp32", "triton"), _retriever(), cpu)
    assert alone._reference_twin() is not reference
