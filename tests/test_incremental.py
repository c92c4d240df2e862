"""Incremental HSTU encoding (pipeline.models.incremental) against a full recompute, and the cached-keys
attention kernel (Triton under the interpreter on the CPU) against the full attention of each row."""
import os
import sys

import numpy as np
import pytest
import torch

# As in test_kernels.py: the interpreter must be chosen before triton is first imported.
_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")
_TRITON_IMPORTED_BEFORE = "triton" in sys.modules
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from pipeline import kernels  # noqa: E402
from pipeline.kernels import cached_attention_reference, hstu_attention_reference  # noqa: E402
from pipeline.models import HSTU, Retriever, SASRec, l2_normalize  # noqa: E402
from pipeline.models.incremental import IncrementalEncoder  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _triton_usable() -> bool:
    return DEVICE.type == "cuda" or not _TRITON_IMPORTED_BEFORE or _INTERPRET_BEFORE == "1"


def _model(time_bias: bool = False, max_len: int = 14, seed: int = 0) -> HSTU:
    torch.manual_seed(seed)
    return HSTU(num_items=60, max_len=max_len, dim=16, num_layers=3, num_heads=2, dropout=0.0,
                linear_dropout=0.0, time_bias=time_bias).to(DEVICE).eval()


def _full_query(model: HSTU, histories: list[torch.Tensor], times: list[torch.Tensor] | None) -> torch.Tensor:
    """encode_last over right-padded histories: the path every request takes today."""
    width = model.position_embedding.num_embeddings
    history = torch.zeros(len(histories), width, dtype=torch.long, device=DEVICE)
    ts = torch.zeros_like(history)
    for b, h in enumerate(histories):
        history[b, : h.numel()] = h
        if times is not None:
            ts[b, : h.numel()] = times[b]
            ts[b, h.numel():] = 10 ** 9  # padding times: must not matter
    lengths = torch.tensor([h.numel() for h in histories], device=DEVICE)
    with torch.no_grad():
        return model.encode_last(history, lengths, ts if times is not None else None)


@pytest.mark.parametrize("time_bias", [False, True])
def test_appends_match_full_recompute(time_bias):
    """Users append 1-5 actions per step from a miss until max_len, as one ragged batch with rows at
    different cached lengths (and a row appending nothing): every step's query equals a full recompute."""
    model = _model(time_bias)
    encoder = IncrementalEncoder(model)
    gen = torch.Generator().manual_seed(1)
    users, max_len = 4, 14
    full = [torch.randint(1, 61, (max_len,), generator=gen).to(DEVICE) for _ in range(users)]
    times = [torch.cumsum(torch.randint(1, 5000, (max_len,), generator=gen), 0).to(DEVICE) for _ in range(users)]
    lengths = [int(torch.randint(1, 4, (1,), generator=gen)) for _ in range(users)]
    queries, states = encoder.encode([None] * users, [full[b][: lengths[b]] for b in range(users)],
                                     [times[b][: lengths[b]] for b in range(users)] if time_bias else None)
    steps = 0
    while min(lengths) < max_len:
        adds = [min(int(torch.randint(0 if b == steps % users else 1, 6, (1,), generator=gen)), max_len - lengths[b])
                for b in range(users)]
        new = [full[b][lengths[b]: lengths[b] + adds[b]] for b in range(users)]
        new_ts = [times[b][lengths[b]: lengths[b] + adds[b]] for b in range(users)] if time_bias else None
        before = [s.keys.clone() for s in states]
        queries, states = encoder.encode(states, new, new_ts)
        lengths = [lengths[b] + adds[b] for b in range(users)]
        expected = _full_query(model, [full[b][: lengths[b]] for b in range(users)],
                               [times[b][: lengths[b]] for b in range(users)] if time_bias else None)
        torch.testing.assert_close(queries, expected, atol=2e-6, rtol=1e-5)
        for b in range(users):
            assert states[b].length == lengths[b]
            # The cached prefix is carried over unchanged: the state only grows.
            torch.testing.assert_close(states[b].keys[:, : before[b].shape[1]], before[b], atol=0, rtol=0)
        steps += 1
    assert steps >= 3


def test_time_bias_uses_the_new_actions_times():
    """With time_bias the appended action's own time enters its bias: another time, another query."""
    model = _model(time_bias=True)
    with torch.no_grad():  # a bias large enough to show in the output
        for layer in model.layers:
            layer.relative_bias.time_weight.normal_(std=1.0)
    encoder = IncrementalEncoder(model)
    items = torch.tensor([3, 5, 7, 9], device=DEVICE)
    times = torch.tensor([10, 20, 4000, 10 ** 7], device=DEVICE)
    _, (state,) = encoder.encode([None], [items[:3]], [times[:3]])
    q1, _ = encoder.encode([state], [items[3:]], [times[3:]])
    q2, _ = encoder.encode([state], [items[3:]], [torch.tensor([4001], device=DEVICE)])
    assert not torch.allclose(q1, q2)
    torch.testing.assert_close(q1, _full_query(model, [items], [times]), atol=2e-6, rtol=1e-5)


def test_top_k_of_incremental_queries_equals_the_retriever():
    """The retrieval head on the incremental query: the retriever's own top-K, at fp32 overlap 1 up to ties."""
    model = _model()
    retriever = Retriever(model, k=10).eval()
    encoder = IncrementalEncoder(model)
    gen = torch.Generator().manual_seed(2)
    history = torch.randint(1, 61, (5, 14), generator=gen).to(DEVICE)
    lengths = torch.tensor([14, 9, 4, 12, 2], device=DEVICE)
    history[torch.arange(14, device=DEVICE)[None] >= lengths[:, None]] = 0
    _, states = encoder.encode([None] * 5, [history[b, : lengths[b] - 1] for b in range(5)])
    queries, _ = encoder.encode(states, [history[b, lengths[b] - 1: lengths[b]] for b in range(5)])
    with torch.no_grad():
        ids, scores = retriever(history, lengths)
        inc_ids, inc_scores = retriever.rank(l2_normalize(queries), history)
    torch.testing.assert_close(inc_scores, scores, atol=1e-5, rtol=0)
    overlap = (inc_ids[:, :, None] == ids[:, None, :]).any(-1).float().mean().item()
    assert overlap >= 0.999


def test_refuses_what_it_cannot_encode_exactly():
    model = _model()
    encoder = IncrementalEncoder(model)
    _, (state,) = encoder.encode([None], [torch.arange(1, 13, device=DEVICE)])
    with pytest.raises(ValueError, match="exceed max_len=14.*recomputed"):
        encoder.encode([state], [torch.tensor([1, 2, 3], device=DEVICE)])
    with pytest.raises(ValueError, match="no cached state and no actions"):
        encoder.encode([None], [torch.empty(0, dtype=torch.long, device=DEVICE)])
    with pytest.raises(ValueError, match="HSTU only"):
        IncrementalEncoder(SASRec(num_items=10, max_len=5, dim=8))
    with pytest.raises(ValueError, match="training mode"):
        IncrementalEncoder(model.train())


def _row_by_row(q, kc, vc, kn, vn, c, n, ql, weight, max_len):
    """Each row's keys put back in sequence and run through the full-attention reference: the rows of the
    [T, T] matrix at the query positions."""
    out, co, no, qo = [], 0, 0, 0
    for cb, nb, qb in zip(c, n, ql):
        T = cb + nb
        keys = torch.cat([kc[co: co + cb], kn[no: no + nb]])[None]
        values = torch.cat([vc[co: co + cb], vn[no: no + nb]])[None]
        queries = torch.zeros_like(keys)
        queries[0, T - qb:] = q[qo: qo + qb]
        pos = torch.arange(T, device=q.device)
        bias = weight[pos[None, :] - pos[:, None] + max_len - 1][None]
        mask = (pos[None, :] <= pos[:, None])[None]
        out.append(hstu_attention_reference(queries, keys, values, bias, mask, max_len)[0, T - qb:])
        co, no, qo = co + cb, no + nb, qo + qb
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_attention_kernel_matches_full_attention(dtype):
    """Ragged rows: misses (nothing cached; one longer than a query block), a row with more keys than a key
    block, one query vs several, dv != dqk; Triton and the reference against each row's full attention."""
    if not _triton_usable():
        pytest.skip("triton was imported before this module without TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(3)
    H, dqk, dv, max_len = 2, 8, 12, 40
    c, n, ql = [0, 21, 5, 33, 0], [3, 1, 5, 2, 20], [3, 1, 1, 2, 20]  # the last: a miss over two query blocks
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE, dtype)  # noqa: E731
    q, kc, vc, kn, vn = rand(sum(ql), H, dqk), rand(sum(c), H, dqk), rand(sum(c), H, dv), rand(sum(n), H, dqk), rand(sum(n), H, dv)
    weight = rand(2 * max_len - 1)
    meta = lambda xs: torch.tensor(xs, device=DEVICE)  # noqa: E731
    offsets = lambda xs: meta([sum(xs[:i]) for i in range(len(xs))])  # noqa: E731
    args = (q, kc, vc, kn, vn, offsets(c), meta(c), offsets(n), meta(n), offsets(ql), meta(ql))
    widths = dict(position_weight=weight, max_len=max_len, max_keys=max(a + b for a, b in zip(c, n)), max_queries=20)
    expected = _row_by_row(*(t.float() for t in (q, kc, vc, kn, vn)), c, n, ql, weight.float(), max_len)
    reference = cached_attention_reference(*args, *widths.values())
    with kernels.use("triton", op="hstu_attention"):
        fused = kernels.hstu_cached_attention(*args, **widths)
    atol = 1e-5 if dtype == torch.float32 else 3e-2
    assert fused.shape == (sum(ql), H, dv) and fused.dtype == dtype
    torch.testing.assert_close(reference.float(), expected, atol=atol, rtol=1e-2)
    torch.testing.assert_close(fused.float(), expected, atol=atol, rtol=1e-2)

    # Paged: each row's cached keys in pages of 4 scattered over a pool (the last page partly filled), read
    # in place through the page table by both paths.
    S = 4
    rows_pages = [-(-cb // S) for cb in c]
    perm = torch.randperm(sum(rows_pages) + 3, generator=gen)                  # 3 pages nobody uses
    table = perm[: sum(rows_pages)].to(DEVICE)
    k_pool, v_pool = rand(len(perm) * S, H, dqk), rand(len(perm) * S, H, dv)
    at, page_off = 0, []
    for cb, pages in zip(c, rows_pages):
        page_off.append(sum(rows_pages[: len(page_off)]) * S)
        for j in range(cb):
            slot = int(table[page_off[-1] // S + j // S]) * S + j % S
            k_pool[slot], v_pool[slot] = kc[at + j], vc[at + j]
        at += cb
    paged_args = (q, k_pool, v_pool, kn, vn, meta(page_off), *args[6:])
    for backend in ("reference", "triton"):
        with kernels.use(backend, op="hstu_attention"):
            paged = kernels.hstu_cached_attention(*paged_args, **widths, page_table=table, page_size=S)
        torch.testing.assert_close(paged.float(), expected, atol=atol, rtol=1e-2)


def test_incremental_encoder_with_triton_kernels_matches_full_recompute():
    if not _triton_usable():
        pytest.skip("triton was imported before this module without TRITON_INTERPRET=1")
    model = _model()
    encoder = IncrementalEncoder(model)
    items = [torch.arange(1, 11, device=DEVICE), torch.arange(20, 23, device=DEVICE)]
    with kernels.use("triton", op="hstu_attention"):
        _, states = encoder.encode([None, None], [items[0][:8], items[1][:1]])
        queries, _ = encoder.encode(states, [items[0][8:], items[1][1:]])
    torch.testing.assert_close(queries, _full_query(model, items, None), atol=1e-5, rtol=1e-4)


def test_paged_cache_with_triton_kernels_matches_full_recompute():
    """IncrementalRetriever over a paged KVCache (pages of 3 positions, so rows span several pages and
    append across their edges), the cached keys gathered from the pool into the Triton kernel's flat layout."""
    if not _triton_usable():
        pytest.skip("triton was imported before this module without TRITON_INTERPRET=1")
    from pipeline.serving.kvcache import IncrementalRetriever, KVCache

    model = _model()
    retriever = Retriever(model, k=10).eval()
    engine = IncrementalRetriever(retriever, KVCache(10 ** 6, 0, DEVICE, page_size=3))
    gen = torch.Generator().manual_seed(4)
    full = torch.randint(1, 61, (3, 14), generator=gen).to(DEVICE)
    with kernels.use("triton", op="hstu_attention"):
        for lengths in ([2, 5, 1], [4, 5, 3], [8, 7, 3], [13, 12, 9]):
            lengths = torch.tensor(lengths, device=DEVICE)
            history = torch.where(torch.arange(14, device=DEVICE)[None] < lengths[:, None], full, 0)
            ids, scores, paths = engine.recommend_detailed(history, lengths, [10, 11, 12])
            with torch.no_grad():
                want_ids, want_scores = retriever(history, lengths)
            torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=1e-4)
            assert (ids[:, :, None] == want_ids[:, None, :]).any(-1).float().mean().item() >= 0.999
    assert engine.cache.stats()["hits_device"] == 9
    graphs = engine.encoder.graphs  # every batch's cached keys were in the pool: the padded (graphed) call ran
    assert graphs.eager + graphs.replayed == 4


def _paged_case(model: HSTU, page_size: int = 3):
    """Three rows (cached 5, 0 and 7 positions; appending 2, 4 and 1) over a pool whose pages are scattered:
    the flat inputs of IncrementalEncoder.encode_flat's paged form, as numpy arrays, and the pool."""
    encoder = IncrementalEncoder(model, cuda_graphs=False)
    gen = torch.Generator().manual_seed(7)
    c, m = [5, 0, 7], [2, 4, 1]
    full = [torch.randint(1, 61, (c[b] + m[b],), generator=gen).to(DEVICE) for b in range(3)]
    _, states = encoder.encode([None, None, None], [full[0][:5], full[1][:1], full[2][:7]])
    L, H = encoder.num_layers, encoder.heads
    pages = {0: [6, 2], 2: [0, 4, 3]}  # row 1 is a miss: no pages
    num_pages = 8
    k_pool = torch.randn(L, num_pages * page_size, H, encoder.attn_dim, device=DEVICE)  # garbage elsewhere
    v_pool = torch.randn(L, num_pages * page_size, H, encoder.hidden_dim, device=DEVICE)
    for b, table in pages.items():
        slots = torch.tensor([p * page_size + i % page_size for p in table for i in range(page_size)][: c[b]],
                             device=DEVICE)
        k_pool[:, slots], v_pool[:, slots] = states[b].keys, states[b].values
    page_table = np.array(pages[0] + pages[2], dtype=np.int64)
    c_off = np.array([0, 0, 2 * page_size], dtype=np.int64)
    m_len = np.array(m, dtype=np.int64)
    parts = {
        "items": torch.cat([full[b][c[b]:] for b in range(3)]).cpu().numpy(),
        "positions": np.concatenate([np.arange(c[b], c[b] + m[b]) for b in range(3)]),
        "c_off": c_off, "c_len": np.array(c, dtype=np.int64), "n_off": np.cumsum(m_len) - m_len, "m_len": m_len,
        "last_rows": np.cumsum(m_len) - 1, "page_table": page_table,
    }
    return encoder, parts, k_pool, v_pool, full


@pytest.mark.parametrize("backend,coarse", [("reference", False), ("triton", False), ("reference", True),
                                            ("triton", True)])
def test_padded_paged_call_equals_the_unpadded_one(backend, coarse):
    """PagedGraphs pads the batch (3 rows -> 4, 7 new positions -> 8, 5 page-table entries -> 8, widths to
    powers of two) so that a CUDA graph serves many batches; the padding must change nothing: the same
    queries and new keys as encode_flat on the exact shapes, which equal a full recompute."""
    if backend == "triton" and not _triton_usable():
        pytest.skip("triton was imported before this module without TRITON_INTERPRET=1")
    model = _model()
    encoder, parts, k_pool, v_pool, full = _paged_case(model)
    t = {k: torch.as_tensor(v, device=DEVICE) for k, v in parts.items()}
    encoder.graphs.coarse = coarse  # the CUDA graphs' padding (widths to their bounds), run eagerly here
    with kernels.use(backend, op="hstu_attention"):
        want = encoder.encode_flat(k_pool, v_pool, t["items"], t["positions"], t["c_off"], t["c_len"], t["n_off"],
                                   t["m_len"], t["last_rows"], 8, 4, page_table=t["page_table"], page_size=3)
        got = encoder.graphs.run(k_pool, v_pool, None, 3, parts, 8, 4)
    (bucket,) = encoder.graphs._buckets.values()
    assert bucket.sizes["c_len"] == 4 and bucket.sizes["items"] == 8
    assert bucket.sizes["page_table"] == (4 * 5 if coarse else 8)  # max_len 14 in pages of 3: 5 per row
    assert encoder.graphs.eager == 1 and encoder.graphs.captured == 0
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[0], _full_query(model, full, None), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("coarse,buckets", [(True, 1), (False, 2)])
def test_graph_shapes_depend_on_rows_and_positions_only(coarse, buckets):
    """With CUDA graphs a shape is (rows, new positions): batches whose longest history differs share one graph
    (a served stream would otherwise capture again and again); eager calls keep tight widths."""
    encoder, parts, k_pool, v_pool, _ = _paged_case(_model())
    encoder.graphs.coarse = coarse
    for max_keys in (8, 13):
        encoder.graphs.run(k_pool, v_pool, None, 3, parts, max_keys, 4)
    assert len(encoder.graphs._buckets) == buckets


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_paged_graphs_replay_new_inputs_exactly():
    """On CUDA the paged call is captured once per bucket and replayed: a second batch of the same bucket,
    other rows and values, must give its own answer (the graph reads the new inputs), as eager does."""
    model = _model()
    encoder, parts, k_pool, v_pool, full = _paged_case(model)
    graphed = IncrementalEncoder(model, cuda_graphs=True)
    with kernels.use("triton", op="hstu_attention"):
        first = [t.clone() for t in graphed.graphs.run(k_pool, v_pool, None, 3, parts, 8, 4)]
        swapped = {**parts, "items": parts["items"][::-1].copy()}
        second = [t.clone() for t in graphed.graphs.run(k_pool, v_pool, None, 3, swapped, 8, 4)]
        eager_first = encoder.graphs.run(k_pool, v_pool, None, 3, parts, 8, 4)
        eager_second = [t.clone() for t in encoder.graphs.run(k_pool, v_pool, None, 3, swapped, 8, 4)]
    assert graphed.graphs.captured == 1 and graphed.graphs.replayed == 2
    torch.testing.assert_close(first[0], _full_query(model, full, None), atol=1e-4, rtol=1e-3)
    for g, w in zip(second, eager_second):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(first[0], second[0])
    del eager_first
