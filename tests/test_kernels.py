"""Each Triton kernel against its PyTorch reference: under the interpreter on small shapes on the CPU,
at full shapes on a GPU (marked gpu)."""
import os
import sys

import pytest
import torch

# Without a GPU the kernels run in Triton's interpreter, which triton reads when its jit functions are
# defined, tl.argmax & co. included: so before triton is first imported. Restored after this module.
_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")
_TRITON_IMPORTED_BEFORE = "triton" in sys.modules
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from pipeline import kernels  # noqa: E402
from pipeline.kernels import hstu_attention_reference, retrieval_top_k_reference  # noqa: E402

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True, scope="module")
def interpreter_without_gpu():
    if DEVICE.type == "cpu" and _TRITON_IMPORTED_BEFORE and _INTERPRET_BEFORE != "1":
        pytest.skip("triton was imported before this module without TRITON_INTERPRET=1; run "
                    "`TRITON_INTERPRET=1 pytest tests/test_kernels.py`")
    yield
    if _INTERPRET_BEFORE is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _INTERPRET_BEFORE


@pytest.fixture(autouse=True)
def kernels_untuned_on_gpu(request, monkeypatch):
    """The GPU tests check our kernels at full shapes. With the tuner on, an op could be served by its
    reference (leaving the kernel unchecked) and each shape would spend its tuning budget compiling configs;
    off, every op runs its kernel's default config, and the whole compiled call runs ours, not its twin."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    from pipeline.kernels import dispatch

    monkeypatch.setenv("GENREC_AUTOTUNE", "0")
    dispatch.reset()
    yield
    dispatch.reset()


def _fused_top_k(*args):
    with kernels.use("triton", op="retrieval"):
        return kernels.retrieval_top_k(*args)


def _check_top_k(query, table, history, k, scales, scores, ids, atol):
    """Valid top-k: never column 0 or a seen item among finite scores, ids' true scores match, and the
    sorted scores match the reference's (ties may pick different ids)."""
    ref_scores, _ = retrieval_top_k_reference(query, table, history, k, scales)
    full = query.float() @ table.float().T
    if scales is not None:
        full = full * scales
    torch.testing.assert_close(scores.float(), ref_scores.float(), atol=atol, rtol=0)
    finite = torch.isfinite(scores)
    assert (ids[finite] != 0).all()
    for row in range(query.shape[0]):
        mine = ids[row][finite[row]]
        assert mine.unique().numel() == mine.numel(), "an item returned twice"
        assert not torch.isin(mine, history[row]).any(), "a seen item returned"
        torch.testing.assert_close(full[row, mine], scores[row][finite[row]].float(), atol=atol, rtol=0)


def _case(batch, num_items, dim, hist_len, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, dim, generator=gen).to(dtype)
    table = torch.randn(num_items + 1, dim, generator=gen).to(dtype)
    history = torch.randint(0, num_items + 1, (batch, hist_len), generator=gen)
    history[:, hist_len // 2 + 1:] = 0  # right padding
    return query.to(DEVICE), table.to(DEVICE), history.to(DEVICE)


@pytest.mark.parametrize(
    "batch,num_items,dim,k,dtype",
    [
        (3, 100, 24, 10, torch.float32),   # N+1 not a multiple of the block, odd batch and width
        (17, 70, 16, 70, torch.float32),   # k equal to the item count: -inf slots after filtering
        (2, 50, 16, 5, torch.float16),
        (2, 50, 16, 5, torch.bfloat16),
    ],
)
def test_fused_retrieval_matches_reference(batch, num_items, dim, k, dtype):
    query, table, history = _case(batch, num_items, dim, hist_len=7, dtype=dtype)
    scores, ids = _fused_top_k(query, table, history, k, None)
    atol = 1e-4 if dtype == torch.float32 else 5e-2
    _check_top_k(query, table, history, k, None, scores, ids, atol)


@pytest.mark.parametrize("config", [
    dict(block_b=16, block_n=32, tiles_per_chunk=2, num_warps=1, num_stages=1),               # whole width at once
    dict(block_b=16, block_n=32, tiles_per_chunk=3, num_warps=1, num_stages=1, block_d=16),  # width in steps
    dict(block_b=1, block_n=32, tiles_per_chunk=2, num_warps=1, num_stages=1),                # CUDA-core kernel
    dict(block_b=1, block_n=32, tiles_per_chunk=2, num_warps=1, num_stages=1, keep=4),        # fewer kept
    dict(block_b=16, block_n=32, tiles_per_chunk=2, num_warps=1, num_stages=1, merge="triton"),  # our merge
    dict(block_b=1, block_n=16, tiles_per_chunk=2, num_warps=1, num_stages=1, keep=4, merge="triton"),
    dict(block_b=16, block_n=32, tiles_per_chunk=3, num_warps=1, num_stages=1, buckets=True),  # per-bucket top-2
    dict(block_b=16, block_n=16, tiles_per_chunk=4, num_warps=1, num_stages=1, keep=4, buckets=True, merge="triton"),
])
@pytest.mark.parametrize("scaled", [False, True])
def test_every_kernel_shape_the_tuner_may_pick(config, scaled):
    """The tuner chooses among these on a GPU: each must be exact on its own (int8 tables too)."""
    from pipeline.kernels.triton_retrieval import Config, fused_top_k

    query, table, history = _case(5, 250, 24, hist_len=9, dtype=torch.float32, seed=1)
    scales = None
    if scaled:
        scales = (table.abs().amax(dim=1) / 127).clamp(min=1e-8)
        table = (table / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    scores, ids, unsure = fused_top_k(query, table, history, 30, scales, Config(**config))
    scores, ids = kernels.fix_unsure(query, table, history, 30, scales, scores, ids, unsure)
    _check_top_k(query, table, history, 30, scales, scores, ids, 1e-3)


def test_every_config_in_the_tuner_lists_is_exact():
    """Every candidate the GPU tuner may choose, each block shape once, on a table of several chunks: the
    exact top-k after the fix. (It found the CUDA-core kernel replacing a kept item with a worse one when an
    earlier pass of the same tile had raised the floor past it.)"""
    from pipeline.kernels.triton_retrieval import _CANDIDATES, fused_top_k

    query, table, history = _case(5, 300, 24, hist_len=9, dtype=torch.float32, seed=1)
    shapes = {}
    for configs in _CANDIDATES.values():
        for cfg in configs:  # num_warps and num_stages do not change what the interpreter computes
            shapes.setdefault((cfg.block_b, cfg.block_n, cfg.tiles_per_chunk, cfg.block_d, cfg.keep, cfg.merge,
                               cfg.buckets), cfg)
    assert len(shapes) > 20
    for cfg in shapes.values():
        scores, ids, unsure = fused_top_k(query, table, history, 30, None, cfg)
        scores, ids = kernels.fix_unsure(query, table, history, 30, None, scores, ids, unsure)
        _check_top_k(query, table, history, 30, None, scores, ids, 1e-3)


@pytest.mark.parametrize("merge", ["torch", "triton"])
def test_bucket_kernel_flags_a_crowded_bucket(merge):
    """Bucket (row, column j) of the bucket kernel keeps two items: a row whose three best items share one
    bucket is marked unsure (and fixed exactly); rows without such crowding are not."""
    from pipeline.kernels.triton_retrieval import Config, candidates

    query, table, history = _case(4, 255, 16, hist_len=3, dtype=torch.float32, seed=3)
    history[:] = 0
    cfg = Config(16, 16, 4, 1, 1, 0, 4, merge, buckets=True)  # chunks of 4 tiles of 16 items
    for n, item in enumerate((5, 21, 37, 53)):  # column 5 of the first chunk's four tiles
        table[item] = query[0] * (2.0 - 0.1 * n)
    scores, ids, unsure = candidates(query, table, history, 8, None, cfg)
    assert unsure.tolist() == [True, False, False, False]
    assert not torch.isin(torch.tensor([37, 53], device=DEVICE), ids[0]).all()  # the bucket held only two
    scores, ids = kernels.fix_unsure(query, table, history, 8, None, scores, ids, unsure)
    _check_top_k(query, table, history, 8, None, scores, ids, 1e-3)
    assert ids[0, :4].tolist() == [5, 21, 37, 53]


@pytest.mark.parametrize("num_items,k", [(300, 25), (70, 70)])  # many chunks; k = items (-inf slots)
def test_merge_kernel_answers_as_torch_topk(num_items, k):
    """The Triton merge against the torch.topk merge on the same candidates: the same scores in the same
    order (negative ones, ties and -inf slots included), ids with those scores, and the same unsure rows."""
    from pipeline.kernels.triton_retrieval import Config, candidates

    query, table, history = _case(6, num_items, 16, hist_len=8, dtype=torch.float32, seed=5)
    table[10:30] = table[10]                     # ties
    query[5] = -query[5].abs()                   # a row of mostly negative scores
    table[1:] = table[1:] * torch.sign(table[1:].sum(dim=1, keepdim=True))  # ... and positive ones
    outputs = {}
    for merge in ("torch", "triton"):
        outputs[merge] = candidates(query, table, history, k, None, Config(1, 16, 2, 1, 1, 0, 4, merge))
    (s_ref, i_ref, u_ref), (s, i, u) = outputs["torch"], outputs["triton"]
    assert torch.equal(s, s_ref) and torch.equal(u, u_ref) and i.dtype == i_ref.dtype
    full = query @ table.T
    finite = torch.isfinite(s)
    torch.testing.assert_close(full.gather(1, i)[finite], s[finite], atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch,length,chunks,chunk", [(3, 19, 5, 16), (1, 200, 70, 32), (2, 1, 1, 8)])
def test_history_sort_and_chunk_bounds_match_torch(batch, length, chunks, chunk):
    from pipeline.kernels.triton_retrieval import _history_bounds

    gen = torch.Generator().manual_seed(length)
    history = torch.randint(0, chunks * chunk + 3, (batch, length), generator=gen)
    history[0, : length // 2] = 0  # padding sorts first, like any item
    hist, bounds = _history_bounds(history.to(DEVICE), chunks, chunk)
    expected = history.sort(dim=1).values
    edges = (torch.arange(chunks + 1) * chunk).expand(batch, -1).contiguous()
    assert hist.dtype == torch.int32 and torch.equal(hist.cpu().long(), expected)
    assert torch.equal(bounds.cpu().long(), torch.searchsorted(expected, edges))


def test_fused_retrieval_ties_and_crowded_block():
    """Many equal rows, and the whole top-k inside one block (more than a block keeps): still exact."""
    query, table, history = _case(2, 90, 16, hist_len=5, dtype=torch.float32)
    table[1:40] = table[1]          # ties
    table[41:61] = 10 * query[0]    # 20 top items for row 0 in one or two blocks
    scores, ids = _fused_top_k(query, table, history, 25, None)
    _check_top_k(query, table, history, 25, None, scores, ids, 1e-4)


def test_fused_retrieval_int8_table():
    query, table, history = _case(4, 75, 32, hist_len=6, dtype=torch.float32)
    scales = (table.abs().amax(dim=1) / 127).clamp(min=1e-8)
    table_int8 = (table / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    scores, ids = _fused_top_k(query, table_int8, history, 12, scales)
    _check_top_k(query, table_int8, history, 12, scales, scores, ids, 1e-3)


def test_fused_retrieval_marks_only_rows_a_chunk_may_have_cut():
    """Without the check, a row whose top-k crowds one chunk is marked unsure (and is then fixed); rows with
    spread-out winners are exact already and unmarked. Nothing of this reads back to the host."""
    query, table, history = _case(3, 2000, 16, hist_len=4, dtype=torch.float32, seed=3)
    table[100:120] = 5 * query[1] + 0.01 * torch.arange(20, device=DEVICE)[:, None]  # row 1's top 20 in one chunk
    for row in (0, 2):  # orthogonal to row 1's query: those items are not their winners
        query[row] -= (query[row] @ query[1]) / (query[1] @ query[1]) * query[1]
    with kernels.use("triton", op="retrieval"):
        scores, ids, unsure = kernels.retrieval_top_k_candidates(query, table, history, 20)
    assert unsure.tolist() == [False, True, False]
    for row in (0, 2):
        ref_scores, _ = retrieval_top_k_reference(query[row:row + 1], table, history[row:row + 1], 20)
        torch.testing.assert_close(scores[row:row + 1], ref_scores, atol=1e-4, rtol=0)
    fixed_scores, fixed_ids = kernels.fix_unsure(query, table, history, 20, None, scores, ids, unsure)
    _check_top_k(query, table, history, 20, None, fixed_scores, fixed_ids, 1e-4)
    assert set(fixed_ids[1].tolist()) == set(range(100, 120)) - set(history[1].tolist())


def _attention_case(batch, length, heads, dqk, dv, max_len, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, length, heads, dqk, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(batch, length, heads, dv, generator=gen).to(dtype)
    weight = (0.1 * torch.randn(2 * max_len - 1, generator=gen)).to(dtype)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = length
    return [t.to(DEVICE) for t in (q, k, v, weight, lengths)]


def _reference_attention(q, k, v, weight, lengths, max_len):
    L = q.shape[1]
    positions = torch.arange(L, device=q.device)
    bias = weight[positions[None, :] - positions[:, None] + max_len - 1].unsqueeze(0)
    valid = positions[None, :] < lengths[:, None]
    mask = (positions[:, None] >= positions[None, :]).unsqueeze(0) & valid.unsqueeze(1)
    return hstu_attention_reference(q, k, v, bias, mask, max_len), mask


def _raw_projection_views(q, k, v):
    """q, k, v as HSTU passes them with silu_inputs: head views of slices of one wide [B, L, W] tensor."""
    B, L, H, dqk = q.shape
    dv = v.shape[-1]
    wide = torch.cat([t.reshape(B, L, -1) for t in (v, q, k)], dim=-1)
    v2, q2, k2 = wide.split([H * dv, H * dqk, H * dqk], dim=-1)
    return q2.view(B, L, H, dqk), k2.view(B, L, H, dqk), v2.view(B, L, H, dv)


@pytest.mark.parametrize("silu_inputs", [False, True])
@pytest.mark.parametrize(
    "batch,length,heads,dqk,dv,max_len,dtype",
    [
        (3, 19, 2, 8, 8, 24, torch.float32),   # odd lengths, padding, head dims below a tile
        (2, 33, 1, 16, 24, 40, torch.float32),  # several key blocks, dv != dqk
        (2, 17, 2, 16, 16, 17, torch.bfloat16),
    ],
)
def test_fused_hstu_attention_matches_reference(batch, length, heads, dqk, dv, max_len, dtype, silu_inputs):
    """Also with silu_inputs: q, k, v pre-activation, strided views of one projection, SiLU applied on load."""
    q, k, v, weight, lengths = _attention_case(batch, length, heads, dqk, dv, max_len, dtype)
    if silu_inputs:
        q, k, v = _raw_projection_views(q, k, v)
        assert not q.is_contiguous()
    act = torch.nn.functional.silu if silu_inputs else (lambda t: t)
    expected, mask = _reference_attention(act(q.float()), act(k.float()), act(v.float()), weight.float(), lengths, max_len)
    with kernels.use("triton", op="hstu_attention"):
        out = kernels.hstu_attention(q, k, v, mask=mask, lengths=lengths, max_len=max_len,
                                     bias=lambda: pytest.fail("the kernel computes its own bias"),
                                     position_weight=weight, silu_inputs=silu_inputs)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=1e-2)
    # The reference op applies the same activation: the switch changes the kernel, not the function.
    reference = kernels.hstu_attention(q.float(), k.float(), v.float(), mask=mask, lengths=lengths, max_len=max_len,
                                       bias=lambda: _reference_bias(weight.float(), q.shape[1], max_len),
                                       position_weight=weight.float(), silu_inputs=silu_inputs)
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=1e-5)


def _reference_bias(weight, length, max_len):
    positions = torch.arange(length, device=weight.device)
    return weight[positions[None, :] - positions[:, None] + max_len - 1].unsqueeze(0)


@pytest.mark.parametrize("silu_u", [False, True])
@pytest.mark.parametrize("rows,width,dtype", [(7, 24, torch.float32), (5, 64, torch.bfloat16), (1, 10, torch.float32)])
def test_layer_norm_gate_matches_reference(rows, width, dtype, silu_u):
    """layer_norm(x) * u in one pass, also with u a row-strided slice of a wider projection (as in HSTU),
    and with silu_u (u pre-activation)."""
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, rows, width, generator=gen) + 1).to(dtype).to(DEVICE)
    wide = torch.randn(2, rows, 3 * width, generator=gen).to(dtype).to(DEVICE)
    u = wide[..., width: 2 * width]
    gate = torch.nn.functional.silu(u.float()) if silu_u else u.float()
    expected = torch.nn.functional.layer_norm(x.float(), (width,), eps=1e-6) * gate
    torch.testing.assert_close(kernels.layer_norm_gate_reference(x.float(), u.float(), 1e-6, silu_u), expected)
    with kernels.use("triton", op="ln_gate"):
        out = kernels.layer_norm_gate(x, u, 1e-6, silu_u)
    assert out.shape == x.shape and out.dtype == dtype
    atol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=1e-2)


def test_switch_defaults_to_reference_and_checks_names():
    assert all(kernels.backend(op) == "reference" for op in kernels.OPS)
    with kernels.use("triton"):
        assert kernels.backend("retrieval") == "triton"
    assert kernels.backend("retrieval") == "reference"
    with pytest.raises(ValueError, match="valid choices"):
        kernels.set_backend("cuda")


def test_hstu_model_with_triton_kernels_matches_reference():
    from pipeline.models import HSTU, Retriever

    torch.manual_seed(0)
    model = HSTU(num_items=60, max_len=12, dim=16, num_layers=2, num_heads=2, dropout=0.0, linear_dropout=0.0)
    retriever = Retriever(model, k=10).to(DEVICE).eval()
    history = torch.randint(1, 61, (3, 12), device=DEVICE)
    lengths = torch.tensor([12, 5, 1], device=DEVICE)
    history[1, 5:] = 0
    history[2, 1:] = 0
    with torch.no_grad():
        ref_ids, ref_scores = retriever(history, lengths)
        with kernels.use("triton"):
            ids, scores = retriever(history, lengths)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=0)
    assert (ids == ref_ids).float().mean() > 0.9  # only near-ties may swap


def test_ops_trace_through_torch_compile():
    """The fake implementations let torch.compile trace the custom ops without running them."""
    query, table, history = _case(2, 40, 16, hist_len=4, dtype=torch.float32)
    fn = torch.compile(lambda q: torch.ops.genrec.retrieval_top_k_candidates(q, table, history, 5, None),
                       backend="eager", fullgraph=True)
    scores, ids, unsure = fn(query)
    scores, ids = kernels.fix_unsure(query, table, history, 5, None, scores, ids, unsure)
    _check_top_k(query, table, history, 5, None, scores, ids, 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Each case compiles its own kernel config (a cold Triton cache takes seconds per config on the GPU host):
# both dtypes and the three batch regimes (one row, a tile of rows, many tiles), not their product.
@pytest.mark.parametrize("batch,dtype", [(1, torch.bfloat16), (16, torch.float16), (1024, torch.bfloat16)])
def test_fused_retrieval_full_shape(batch, dtype):
    query, table, history = _case(batch, 1_000_000, 256, hist_len=200, dtype=dtype)
    query, table = torch.nn.functional.normalize(query.float(), dim=-1).to(dtype), table
    scores, ids = _fused_top_k(query, table, history, 100, None)
    ref_scores, ref_ids = retrieval_top_k_reference(query, table, history, 100)
    torch.testing.assert_close(scores.float(), ref_scores.float(), atol=0.1, rtol=1e-2)
    overlap = (ids[:, :, None] == ref_ids[:, None, :]).any(-1).float().mean()
    assert overlap > 0.98


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch,buckets", [(1, False), (1024, False), (1024, True)])
def test_fused_top_k_full_shape(batch, buckets):
    """A fixed tile config, untuned, at the standard workload's shape."""
    from pipeline.kernels.triton_retrieval import Config, fused_top_k

    query, table, history = _case(batch, 1_000_000, 256, hist_len=200, dtype=torch.bfloat16)
    query = torch.nn.functional.normalize(query.float(), dim=-1).to(torch.bfloat16)
    cfg = Config(64 if batch > 16 else 16, 128, 16, 8 if buckets else 4, 3, 64, buckets=buckets)
    scores, ids, unsure = fused_top_k(query, table, history, 100, None, cfg)
    scores, ids = kernels.fix_unsure(query, table, history, 100, None, scores, ids, unsure)
    ref_scores, ref_ids = retrieval_top_k_reference(query, table, history, 100)
    torch.testing.assert_close(scores.float(), ref_scores.float(), atol=0.1, rtol=1e-2)
    assert (ids[:, :, None] == ref_ids[:, None, :]).any(-1).float().mean() > 0.98
    assert unsure.float().mean() < 0.01  # the check is the exception, not the rule


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_hstu_attention_full_shape(dtype):
    q, k, v, weight, lengths = _attention_case(64, 200, 4, 64, 64, 200, dtype)
    expected, mask = _reference_attention(q.float(), k.float(), v.float(), weight.float(), lengths, 200)
    with kernels.use("triton", op="hstu_attention"):
        out = kernels.hstu_attention(q, k, v, mask=mask, lengths=lengths, max_len=200, bias=lambda: None,
                                     position_weight=weight)
    torch.testing.assert_close(out.float(), expected, atol=2e-2 if dtype == torch.bfloat16 else 1e-3, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_int8_table_retriever_matches_eager():
    """The int8 item table in the captured call (bench variant triton-compile-max-autotune-graph-int8table)
    answers like the eager retriever with the same int8 table and the reference kernels."""
    from pipeline.export.inductor import CompiledRetriever
    from pipeline.models import HSTU, Retriever

    torch.manual_seed(0)
    model = HSTU(num_items=50_000, max_len=50, dim=64, num_layers=2, num_heads=2, dropout=0.0, linear_dropout=0.0)
    retriever = Retriever(model, k=100).to(DEVICE, torch.bfloat16).eval().freeze(int8_table=True)
    history = torch.randint(1, 50_001, (16, 50), device=DEVICE)
    lengths = torch.randint(1, 51, (16,), device=DEVICE)
    with torch.no_grad(), kernels.use("reference"):
        ref_ids, ref_scores = retriever(history, lengths)
    compiled = CompiledRetriever(retriever, "default", "triton", cuda_graph=True)
    for batch in (16, 1):
        for _ in range(3):  # warm-up, record, replay
            ids, scores = compiled(history[:batch], lengths[:batch])
        torch.testing.assert_close(scores.float(), ref_scores[:batch].float(), atol=2e-2, rtol=0)
        assert (ids[:, :, None] == ref_ids[:batch, None, :]).any(-1).float().mean() > 0.98


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# "default" rather than the max-autotune modes the catalogue builds: what is checked is the capture (Inductor's
# CUDA-graph trees, or ours) and the exactness check after it, not Inductor's GEMM templates, whose
# autotuning from a cold cache cost minutes of the GPU suite.
@pytest.mark.parametrize("mode,cuda_graph", [("reduce-overhead", False), ("default", False), ("default", True)])
def test_compiled_triton_retriever_matches_eager_reference(mode, cuda_graph):
    """The CUDA-graph-captured candidates plus the exactness check after them answer like eager PyTorch,
    also when a row's winners crowd one chunk (the check recomputes it)."""
    from pipeline.export.inductor import CompiledRetriever
    from pipeline.models import HSTU, Retriever

    torch.manual_seed(0)
    model = HSTU(num_items=50_000, max_len=50, dim=64, num_layers=2, num_heads=2, dropout=0.0, linear_dropout=0.0)
    retriever = Retriever(model, k=100).to(DEVICE).eval()
    history = torch.randint(1, 50_001, (64, 50), device=DEVICE)
    lengths = torch.randint(1, 51, (64,), device=DEVICE)
    with torch.no_grad():
        ref_ids, ref_scores = retriever(history, lengths)
        query = retriever.query(history[:1], lengths[:1])
        model.item_embedding.weight[1000:1100] = query[0] * model.item_embedding.weight[1000:1100].norm(dim=-1, keepdim=True)
        ref_ids, ref_scores = retriever(history, lengths)
    compiled = CompiledRetriever(retriever.freeze(), mode, "triton", cuda_graph=cuda_graph)
    for _ in range(3):  # warm-up, record, replay
        ids, scores = compiled(history, lengths)
    torch.testing.assert_close(scores.float(), ref_scores.float(), atol=1e-3, rtol=0)
    # A valid top-k up to ties: the 100 planted items have one direction, so each row scores them alike to
    # the last bit, and which of them fill a row's last places is rounding (0.6% of ids on the H200).
    with torch.no_grad():
        full = retriever.score_all(history, lengths)
    torch.testing.assert_close(full.gather(1, ids), ref_scores, atol=1e-5, rtol=0)
    assert (ids[:, :, None] == ref_ids[:, None, :]).any(-1).float().mean() > 0.99
    if cuda_graph:  # a replay answers for its own inputs, and the answer kept from before is not overwritten
        kept = ids
        other_ids, _ = compiled(history.flip(0), lengths.flip(0))
        assert torch.equal(other_ids, ids.flip(0)) and torch.equal(kept, ids)
