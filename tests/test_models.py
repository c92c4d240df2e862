"""Correctness of the encoders (causality, padding), the retrieval head, the loss, and that the whole
retrieval call compiles (torch.compile fullgraph) and exports (torch.export, dynamic batch and length)."""

import types

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.models import (
    HSTU,
    Retriever,
    SASRec,
    build_model,
    l2_normalize,
    last_position,
    mask_history,
    sampled_softmax_loss,
    top_k,
)

NUM_ITEMS, MAX_LEN = 30, 8
ENCODERS = {
    "hstu": lambda: HSTU(NUM_ITEMS, MAX_LEN, dim=8, num_heads=2),
    "hstu_time": lambda: HSTU(NUM_ITEMS, MAX_LEN, dim=8, num_heads=2, attn_dim=3, hidden_dim=5, time_bias=True),
    "sasrec": lambda: SASRec(NUM_ITEMS, MAX_LEN, dim=8, num_heads=2),
}


def make_encoder(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return ENCODERS[name]().eval()


def make_batch(lengths: list[int], seq_len: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Right-padded histories of distinct items and increasing timestamps (gaps of seconds to weeks)."""
    g = torch.Generator().manual_seed(seed)
    history = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    timestamps = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for row, n in enumerate(lengths):
        history[row, :n] = torch.randperm(NUM_ITEMS, generator=g)[:n] + 1
        gaps = (10 ** torch.randint(0, 7, (n,), generator=g)) * torch.randint(1, 9, (n,), generator=g)
        timestamps[row, :n] = 1_700_000_000 + gaps.cumsum(0)
    return history, torch.tensor(lengths), timestamps


def encode(encoder, history, lengths, timestamps):
    with torch.no_grad():
        return encoder(history, lengths, timestamps)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_output_at_a_position_ignores_later_items(name):
    encoder = make_encoder(name)
    history, lengths, timestamps = make_batch([MAX_LEN, MAX_LEN], MAX_LEN)
    before = encode(encoder, history, lengths, timestamps)
    for t in (1, 4, MAX_LEN - 1):
        changed, later = history.clone(), timestamps.clone()
        changed[:, t] = changed[:, t] % NUM_ITEMS + 1
        later[:, t:] += 86_400
        after = encode(encoder, changed, lengths, later)
        torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(after[:, t], before[:, t])


@pytest.mark.parametrize("name", list(ENCODERS))
def test_padding_does_not_change_outputs(name):
    encoder = make_encoder(name)
    lengths_list = [5, 1, 3]
    history, lengths, timestamps = make_batch(lengths_list, 5)
    out = encode(encoder, history, lengths, timestamps)
    pad = torch.nn.functional.pad
    wider = encode(encoder, pad(history, (0, 3)), lengths, pad(timestamps, (0, 3)))
    valid = (torch.arange(5) < lengths.unsqueeze(1)).unsqueeze(-1)
    torch.testing.assert_close(wider[:, :5] * valid, out * valid, rtol=1e-5, atol=1e-6)
    assert (out * ~valid == 0).all() and (wider[:, 5:] == 0).all()
    for row, n in enumerate(lengths_list):
        alone = encode(encoder, history[row : row + 1, :n], lengths[row : row + 1], timestamps[row : row + 1, :n])
        torch.testing.assert_close(alone[0], out[row, :n], rtol=1e-5, atol=1e-6)


def test_time_bias_uses_timestamps_and_requires_them():
    encoder = make_encoder("hstu_time")
    history, lengths, timestamps = make_batch([6, 4], 6)
    spread = timestamps.clone()
    spread[:, 1:] += torch.arange(1, 6) * 3_600 * 24 * 30
    assert not torch.allclose(encode(encoder, history, lengths, timestamps), encode(encoder, history, lengths, spread))
    with pytest.raises(ValueError, match="timestamps"):
        encoder(history, lengths)
    plain = make_encoder("hstu")
    torch.testing.assert_close(encode(plain, history, lengths, timestamps), encode(plain, history, lengths, spread))


def test_history_longer_than_max_len_is_refused():
    history, lengths, _ = make_batch([MAX_LEN + 1], MAX_LEN + 1)
    with pytest.raises(ValueError, match="max_len"):
        make_encoder("sasrec")(history, lengths)


def test_last_position_takes_the_latest_item():
    seq_emb = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    expected = torch.stack([seq_emb[0, 3], seq_emb[1, 0]])
    torch.testing.assert_close(last_position(seq_emb, torch.tensor([4, 1])), expected)


def test_l2_normalize_leaves_zero_rows_finite():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(l2_normalize(x), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def test_mask_history_masks_padding_column_and_seen_items():
    scores = torch.arange(12, dtype=torch.float32).view(2, 6)
    history = torch.tensor([[2, 5, 0], [1, 3, 4]])  # the second row has no padding
    masked = mask_history(scores, history)
    inf = float("-inf")
    expected = torch.tensor([[inf, 1.0, inf, 3.0, 4.0, inf], [inf, inf, 8.0, inf, inf, 11.0]])
    torch.testing.assert_close(masked, expected)
    assert scores[0, 0] == 0.0


def test_top_k_sorted_with_ties_and_k_equal_to_item_count():
    scores = torch.tensor([[float("-inf"), 0.5, 2.0, 0.5, 1.0]])
    values, ids = top_k(scores, 3)
    torch.testing.assert_close(values, torch.tensor([[2.0, 1.0, 0.5]]))
    assert ids[0, :2].tolist() == [2, 4] and ids[0, 2].item() in (1, 3) and ids.dtype == torch.long
    values, ids = top_k(scores, 4)
    torch.testing.assert_close(values, torch.tensor([[2.0, 1.0, 0.5, 0.5]]))
    assert ids[0, :2].tolist() == [2, 4] and sorted(ids[0, 2:].tolist()) == [1, 3]


@pytest.mark.parametrize("name", ["hstu", "sasrec"])
def test_retriever_never_returns_seen_items_or_padding(name):
    history, lengths, _ = make_batch([MAX_LEN, 3, 1], MAX_LEN, seed=1)
    k = NUM_ITEMS - MAX_LEN
    ids, scores = Retriever(make_encoder(name), k=k)(history, lengths)
    assert ids.shape == scores.shape == (3, k) and ids.dtype == torch.long
    for row in range(3):
        assert not set(ids[row].tolist()) & (set(history[row].tolist()) | {0})
        assert len(set(ids[row].tolist())) == k
    assert (scores[:, :-1] >= scores[:, 1:]).all() and torch.isfinite(scores).all()


def test_retriever_pads_with_id_zero_when_k_exceeds_unseen_items():
    history, lengths, _ = make_batch([3], MAX_LEN)
    ids, scores = Retriever(make_encoder("hstu"), k=NUM_ITEMS)(history, lengths)
    unseen = set(range(1, NUM_ITEMS + 1)) - set(history[0].tolist())
    assert set(ids[0, : len(unseen)].tolist()) == unseen and torch.isfinite(scores[0, : len(unseen)]).all()
    assert (ids[0, len(unseen) :] == 0).all() and torch.isneginf(scores[0, len(unseen) :]).all()
    with pytest.raises(ValueError, match="k="):
        Retriever(make_encoder("hstu"), k=NUM_ITEMS + 1)


def test_score_all_matches_forward():
    retriever = Retriever(make_encoder("sasrec"), k=5)
    history, lengths, _ = make_batch([4, 2], MAX_LEN)
    with torch.no_grad():
        scores = retriever.score_all(history, lengths)
        ids, top = retriever(history, lengths)
    assert scores.shape == (2, NUM_ITEMS + 1) and torch.isneginf(scores[:, 0]).all()
    torch.testing.assert_close(scores.gather(1, ids), top)


def toy_loss_batch(g):
    """Every user walks the items in order: the next item is always the current one + 1."""
    start = torch.randint(1, NUM_ITEMS - MAX_LEN, (16, 1), generator=g)
    walk = start + torch.arange(MAX_LEN + 1)
    lengths = torch.randint(2, MAX_LEN + 1, (16,), generator=g)
    valid = torch.arange(MAX_LEN) < lengths.unsqueeze(1)
    return walk[:, :-1] * valid, lengths, walk[:, 1:] * valid


@pytest.mark.parametrize("per_position", [False, True])
def test_sampled_softmax_loss_learns_a_toy_sequence(per_position):
    torch.manual_seed(0)
    model = HSTU(NUM_ITEMS, MAX_LEN, dim=16, num_heads=2, dropout=0.0, linear_dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        history, lengths, labels = toy_loss_batch(g)
        loss = sampled_softmax_loss(
            model(history, lengths), labels, model.item_embeddings(), 8, 0.05, True, g, per_position
        )
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


@pytest.mark.parametrize("per_position", [False, True])
def test_sampled_softmax_loss_ignores_positions_without_label(per_position):
    g = torch.Generator().manual_seed(0)
    seq_emb, table = torch.randn(2, 4, 6, generator=g), torch.randn(NUM_ITEMS + 1, 6, generator=g)
    labels = torch.tensor([[3, 5, 0, 0], [7, 0, 0, 0]])
    noisy = seq_emb.clone()
    noisy[labels == 0] = 1e3

    def loss(emb, lab, l2_norm):
        return sampled_softmax_loss(emb, lab, table, 5, 0.1, l2_norm, torch.Generator().manual_seed(1), per_position)

    for l2_norm in (True, False):
        torch.testing.assert_close(loss(noisy, labels, l2_norm), loss(seq_emb, labels, l2_norm))
    assert loss(seq_emb, torch.zeros_like(labels), True) == 0.0


@pytest.mark.parametrize("per_position", [False, True])
def test_sampled_softmax_loss_leaves_out_negatives_equal_to_the_positive(per_position):
    table = torch.eye(3)  # items 1 and 2 only; every negative is item 1 or 2
    seq_emb = table[[1]].view(1, 1, 3)
    labels = torch.tensor([[1]])
    loss = sampled_softmax_loss(seq_emb, labels, table, 64, 1.0, False, torch.Generator().manual_seed(0), per_position)
    # Only the draws of item 2 compete: loss = -log(e / (e + m)) with m the number of those draws.
    shape = (1, 1, 64) if per_position else (64,)
    m = (torch.randint(1, 3, shape, generator=torch.Generator().manual_seed(0)) == 2).sum()
    assert 0 < m < 64
    torch.testing.assert_close(loss, torch.log1p(m / torch.e).float())


@pytest.mark.parametrize("per_position", [False, True])
@pytest.mark.parametrize("l2_norm", [False, True])
def test_sampled_softmax_dense_logits_equal_gathered_negatives(per_position, l2_norm):
    """Scoring every item and picking the sampled columns is the same loss, with the same gradients, as
    scoring the gathered negatives: only the cost differs."""
    g = torch.Generator().manual_seed(0)
    seq_emb, table = torch.randn(3, 5, 8, generator=g), torch.randn(NUM_ITEMS + 1, 8, generator=g)
    labels = torch.randint(0, NUM_ITEMS + 1, (3, 5), generator=g)
    results = []
    for dense in (False, True):
        emb, tab = seq_emb.clone().requires_grad_(), table.clone().requires_grad_()
        loss = sampled_softmax_loss(emb, labels, tab, 7, 0.1, l2_norm, torch.Generator().manual_seed(3), per_position, dense)
        loss.backward()
        results.append((loss.detach(), emb.grad, tab.grad))
    for gathered, dense in zip(*results):
        torch.testing.assert_close(dense, gathered)
    assert results[0][0] > 0 and results[0][2].abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("name,backend", [("hstu_time", "inductor"), ("sasrec", "aot_eager")])
def test_compiled_retriever_matches_eager(name, backend):
    torch._dynamo.reset()
    retriever = Retriever(make_encoder(name), k=5)
    history, lengths, timestamps = make_batch([6, 2, 4], 6)
    compiled = torch.compile(retriever, fullgraph=True, backend=backend)
    with torch.no_grad():
        ids, scores = compiled(history, lengths, timestamps)
        expected_ids, expected_scores = retriever(history, lengths, timestamps)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert (ids == expected_ids).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hstu_time", "sasrec"])
def test_exported_retriever_has_dynamic_batch_and_length(name):
    retriever = Retriever(make_encoder(name), k=5)
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=1, max=MAX_LEN)
    example = make_batch([5, 3], 5)
    shapes = {"history": {0: batch, 1: seq}, "lengths": {0: batch}, "timestamps": {0: batch, 1: seq}}
    program = torch.export.export(retriever, example, dynamic_shapes=shapes, strict=False).module()
    for lengths_list, seq_len in (([MAX_LEN, 2, 7], MAX_LEN), ([1], 1), ([4] * 9, 6)):
        inputs = make_batch(lengths_list, seq_len, seed=seq_len)
        with torch.no_grad():
            ids, scores = program(*inputs)
            expected_ids, expected_scores = retriever(*inputs)
        torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-6)
        assert (ids == expected_ids).all()


def test_build_model_from_config():
    cfg = OmegaConf.create(
        {"name": "hstu", "max_len": MAX_LEN, "dim": 8, "num_heads": 2, "attn_dim": None, "time_bias": True,
         "l2_norm": True, "temperature": 0.05}
    )
    model = build_model(cfg, NUM_ITEMS)
    assert isinstance(model, HSTU) and model.item_embeddings().shape == (NUM_ITEMS + 1, 8)
    sasrec = build_model(types.SimpleNamespace(name="sasrec", max_len=MAX_LEN, dim=4, l2_norm=False), NUM_ITEMS)
    assert isinstance(sasrec, SASRec) and sasrec.position_embedding.num_embeddings == MAX_LEN


@pytest.mark.parametrize(
    "options,message",
    [
        ({"name": "bert4rec", "max_len": 8}, "valid names: hstu, sasrec"),
        ({"name": "sasrec", "max_len": 8, "time_bias": True}, "does not take time_bias"),
        ({"name": "hstu", "max_len": 8, "dimm": 8}, "does not take dimm"),
        ({"name": "hstu"}, "needs `max_len`"),
        ({"name": "sasrec", "max_len": 8, "dim": 10, "num_heads": 3}, "divisible"),
    ],
)
def test_build_model_refuses_bad_configs(options, message):
    with pytest.raises(ValueError, match=message):
        build_model(OmegaConf.create(options), NUM_ITEMS)


@pytest.mark.parametrize("time_bias", [False, True])
def test_encode_last_matches_the_full_forward_at_the_last_position(time_bias):
    """Retrieval runs the last layer for one position only: same embedding as the full forward there."""
    torch.manual_seed(0)
    model = HSTU(num_items=40, max_len=10, dim=16, num_layers=3, num_heads=2, time_bias=time_bias).eval()
    history = torch.randint(1, 41, (3, 10))
    lengths = torch.tensor([10, 6, 1])
    history[1, 6:] = 0
    history[2, 1:] = 0
    timestamps = torch.cumsum(torch.randint(1, 10_000, (3, 10)), dim=1) if time_bias else None
    with torch.no_grad():
        full = last_position(model(history, lengths, timestamps), lengths)
        last = model.encode_last(history, lengths, timestamps)
    torch.testing.assert_close(last, full, atol=1e-5, rtol=1e-5)


def test_frozen_retriever_answers_like_the_unfrozen_one():
    torch.manual_seed(0)
    retriever = Retriever(HSTU(num_items=50, max_len=8, dim=16, num_layers=1, num_heads=2), k=7).eval()
    history = torch.randint(1, 51, (4, 8))
    lengths = torch.full((4,), 8)
    with torch.no_grad():
        ids, scores = retriever(history, lengths)
        retriever.freeze()
        frozen_ids, frozen_scores = retriever(history, lengths)
    assert retriever.frozen_table is not None and "frozen_table" not in retriever.state_dict()
    torch.testing.assert_close(frozen_scores, scores)
    assert torch.equal(frozen_ids, ids)


def test_int8_table_keeps_the_ranking_close():
    """An int8 table with per-row scales scores within int8 rounding of the float one."""
    torch.manual_seed(0)
    retriever = Retriever(HSTU(num_items=500, max_len=8, dim=32, num_layers=1, num_heads=2), k=20).eval()
    history = torch.randint(1, 501, (16, 8))
    lengths = torch.full((16,), 8)
    with torch.no_grad():
        ids, scores = retriever(history, lengths)
        retriever.freeze(int8_table=True)
        q_ids, q_scores = retriever(history, lengths)
    assert retriever.frozen_table.dtype == torch.int8 and retriever.table_scales.shape == (501,)
    torch.testing.assert_close(q_scores, scores, atol=0.02, rtol=0)
    assert (q_ids[:, :, None] == ids[:, None, :]).any(-1).float().mean() > 0.9
