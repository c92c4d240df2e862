"""The onnx stage: the dynamo export round trip through ONNX Runtime (dynamic batch and history length),
the checker and external data, clear errors for ops that do not export, custom ops through their
reference. (stage=all producing the ONNX Runtime variant that validate measures: test_end_to_end.py.)"""
import pytest
import torch
from torch import nn

from pipeline import kernels
from pipeline.core import PipelineError, Variant
from pipeline.export import ShapeRange, export_program, register_reference
from pipeline.export.onnx import CUDA, OnnxRetriever, check_onnx, export_onnx, load_onnx_variant
from pipeline.models import HSTU, Retriever, SASRec

NUM_ITEMS, MAX_LEN, K = 40, 12, 10
ENCODERS = {
    "hstu": lambda: HSTU(NUM_ITEMS, MAX_LEN, dim=16, num_heads=2),
    "hstu_time": lambda: HSTU(NUM_ITEMS, MAX_LEN, dim=16, num_heads=2, time_bias=True),
    "sasrec": lambda: SASRec(NUM_ITEMS, MAX_LEN, dim=16, num_heads=2),
}


def make_retriever(name: str) -> Retriever:
    torch.manual_seed(0)
    return Retriever(ENCODERS[name]().eval(), k=K).eval()


def make_batch(lengths: list[int], width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded histories, their lengths, and timestamps with gaps from seconds to weeks."""
    g = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths)
    valid = torch.arange(width) < lengths_t[:, None]
    gaps = torch.randint(1, 3_000_000, (len(lengths), width), generator=g)
    history = torch.randint(1, NUM_ITEMS + 1, (len(lengths), width), generator=g) * valid
    return history, lengths_t, 1_600_000_000 + torch.cumsum(gaps, dim=1) * valid


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each encoder exported once; SASRec's weights go to external data (threshold 0 MB)."""
    out = tmp_path_factory.mktemp("onnx")
    threshold_mb = {"hstu": 1024, "hstu_time": 1024, "sasrec": 0}
    return {
        name: (make_retriever(name), export_onnx(make_retriever(name), out / f"{name}.onnx", None, mb))
        for name, mb in threshold_mb.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hstu", "hstu_time", "sasrec"])
@pytest.mark.parametrize(
    "lengths,width",
    [([1], 1), ([MAX_LEN], MAX_LEN), ([1, MAX_LEN, 5], MAX_LEN), ([3] * 7, 4), ([2, 9] * 16, 10)],
    ids=["b1-len1", "b1-max", "b3-max", "b7-len4", "b32-len10"],
)
def test_export_round_trip_matches_eager(exported, name, lengths, width):
    retriever, export = exported[name]
    session = OnnxRetriever(export.path, "CPUExecutionProvider", num_threads=1)
    history, lengths_t, timestamps = make_batch(lengths, width, seed=width)
    assert session.input_names == (["history", "lengths", "timestamps"] if name == "hstu_time" else ["history", "lengths"])
    ids, scores = session(history, lengths_t, timestamps)
    with torch.no_grad():
        expected_ids, expected_scores = retriever(history, lengths_t, timestamps)
    assert ids.dtype == torch.int64 and ids.shape == (len(lengths), K)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert (ids == expected_ids).all()
    # filtering is inside the graph: no answer repeats an item of its history
    for row, n in zip(range(len(lengths)), lengths):
        assert not set(ids[row].tolist()) & set(history[row, :n].tolist())


@pytest.mark.slow
def test_checker_graph_facts_and_external_data(exported):
    _, inline = exported["hstu"]
    _, external = exported["sasrec"]
    assert inline.opset >= 18 and inline.num_nodes > 10 and inline.size_mb > 0 and inline.export_seconds > 0
    assert not inline.external_data and not inline.path.with_name("hstu.onnx.data").exists()
    assert external.external_data and external.path.with_name("sasrec.onnx.data").exists()
    check_onnx(external.path)  # the full check reads the external weights through the path
    metrics = inline.metrics("fp32")
    assert metrics["onnx_checker_ok_fp32"] == 1.0 and metrics["onnx_nodes_fp32"] == inline.num_nodes


@pytest.mark.slow
def test_corrupt_model_fails_the_checker(tmp_path, exported):
    import onnx

    model = onnx.load(str(exported["hstu"][1].path))
    model.graph.node[0].input[0] = "no_such_value"
    onnx.save(model, str(tmp_path / "broken.onnx"))
    with pytest.raises(PipelineError, match="fails onnx.checker"):
        check_onnx(tmp_path / "broken.onnx")


class BesselEncoder(nn.Module):
    """A tiny encoder with an op the ONNX exporter has no translation for (Bessel function J0)."""

    def __init__(self) -> None:
        super().__init__()
        self.item_embedding = nn.Embedding(NUM_ITEMS + 1, 8)
        self.position_embedding = nn.Embedding(MAX_LEN, 8)

    def item_embeddings(self) -> torch.Tensor:
        return self.item_embedding.weight

    def forward(self, history, lengths, timestamps=None):
        return torch.special.bessel_j0(self.item_embedding(history) + self.position_embedding.weight[: history.size(1)])


@pytest.mark.slow
def test_untranslatable_op_error_names_the_op(tmp_path):
    with pytest.raises(PipelineError) as err:
        export_onnx(Retriever(BesselEncoder(), k=K), tmp_path / "bessel.onnx", None, 1024)
    assert "bessel_j0" in str(err.value) and "no translation" in str(err.value), err.value


def test_export_traces_the_reference_kernels_whatever_backend_is_selected():
    retriever = make_retriever("hstu")
    with kernels.use("triton"):  # as the compile stage may leave it; Triton cannot even run on this CPU
        program = export_program(retriever, ShapeRange(1, 2, None), ShapeRange(1, MAX_LEN, MAX_LEN), torch.device("cpu"))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert targets and not any(t.startswith("genrec.") for t in targets), targets


@torch.library.custom_op("genrec_test::scaled_silu", mutates_args=())
def scaled_silu(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.nn.functional.silu(x) * scale


@scaled_silu.register_fake
def _(x, scale):
    return torch.empty_like(x)


class KernelEncoder(BesselEncoder):
    """Stands for an encoder with a custom kernel swapped in (a torch.library op)."""

    def forward(self, history, lengths, timestamps=None):
        return scaled_silu(self.item_embedding(history) + self.position_embedding.weight[: history.size(1)], 2.0)


def test_custom_op_needs_a_reference_then_exports_through_it(monkeypatch):
    retriever = Retriever(KernelEncoder().eval(), k=K).eval()
    ranges = (ShapeRange(1, 2, None), ShapeRange(1, MAX_LEN, MAX_LEN), torch.device("cpu"))
    monkeypatch.setattr("pipeline.export._REFERENCES", {})
    with pytest.raises(PipelineError, match="genrec_test.scaled_silu.default.*register_reference"):
        export_program(retriever, *ranges)
    register_reference(torch.ops.genrec_test.scaled_silu.default, lambda x, scale: torch.nn.functional.silu(x) * scale)
    program = export_program(retriever, *ranges)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("genrec_test" in t for t in targets) and "aten.silu.default" in targets
    history, lengths, _ = make_batch([3, MAX_LEN], MAX_LEN, seed=1)
    with torch.no_grad():
        for got, want in zip(program.module()(history, lengths), retriever(history, lengths)):
            torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_variant_loader_refuses_other_k_and_missing_provider(exported):
    path = str(exported["hstu"][1].path)
    variant = Variant("onnxruntime-fp32", "onnxruntime", "fp32", path, "onnx", {"provider": "CPUExecutionProvider", "top_k": K})
    ids, _ = load_onnx_variant(variant, torch.device("cpu"), K)(*make_batch([4], 6, seed=0))
    assert ids.shape == (1, K)
    with pytest.raises(PipelineError, match="onnx.top_k=20"):
        load_onnx_variant(variant, torch.device("cpu"), 20)
    import onnxruntime

    if CUDA not in onnxruntime.get_available_providers():
        variant.options["provider"] = CUDA
        with pytest.raises(PipelineError, match="onnxruntime-gpu"):
            load_onnx_variant(variant, torch.device("cpu"), K)
