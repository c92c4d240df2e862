import math

import pytest
import torch

from pipeline.evaluation import parity, ranking_metrics, target_ranks, top_k_metrics


def test_ranking_metrics_hand_computed():
    ranks = torch.tensor([0, 1, 9, 10, 60])
    m = ranking_metrics(ranks, [1, 10, 50])
    assert m["hr1"] == pytest.approx(1 / 5)
    assert m["hr10"] == pytest.approx(3 / 5)
    assert m["hr50"] == pytest.approx(4 / 5)
    ndcg10 = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(11)) / 5
    assert m["ndcg10"] == pytest.approx(ndcg10)
    ndcg50 = ndcg10 + (1 / math.log2(12)) / 5
    assert m["ndcg50"] == pytest.approx(ndcg50)


def test_target_ranks_counts_strictly_higher_and_filtered_target_misses():
    scores = torch.tensor([[-math.inf, 0.9, 0.5, 0.5, 0.1], [-math.inf, -math.inf, 0.3, 0.2, 0.1]])
    ranks = target_ranks(scores, torch.tensor([3, 1]))
    # row 0: only item 1 is strictly higher (the tie with item 2 favours the target)
    # row 1: the target was filtered (-inf), so all three scored items beat it
    assert ranks.tolist() == [1, 3]


def test_top_k_metrics_from_answers():
    ids = torch.tensor([[5, 3, 9], [1, 2, 4], [7, 8, 6]])
    m = top_k_metrics(ids, torch.tensor([3, 4, 11]), ks=[1, 2, 3, 10])
    assert m["hr1"] == 0.0
    assert m["hr2"] == pytest.approx(1 / 3)
    assert m["hr3"] == pytest.approx(2 / 3)
    assert "hr10" not in m  # k beyond the answer length cannot be judged
    assert m["ndcg3"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)


def test_parity_overlap_and_error():
    ref_ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    ref_scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, -math.inf]])
    ids = torch.tensor([[2, 1, 3, 9], [5, 6, 7, 8]])
    scores = torch.tensor([[4.0, 3.0, 2.5, 1.0], [4.0, 3.0, 2.0, -math.inf]])
    p = parity(ids, scores, ref_ids, ref_scores)
    assert p["parity_topk_overlap"] == pytest.approx((3 / 4 + 1) / 2)
    assert p["parity_topk_overlap_min"] == pytest.approx(3 / 4)
    assert p["parity_max_abs_err"] == pytest.approx(0.5)
    assert p["parity_top1_agreement"] == pytest.approx(0.5)


def test_predict_top_k_calls_one_shape_and_drops_the_padding():
    """A partial last batch is padded to the batch size (a shape-specialized variant is not rebuilt for it) and
    the answers are those of the unpadded rows, in order."""
    from pipeline.data import Split
    from pipeline.evaluation import predict_top_k

    users, length = 10, 6
    history = torch.arange(users * length).reshape(users, length) % 17 + 1
    lengths = torch.arange(users) % length + 1
    split = Split(history=history, lengths=lengths, target=torch.ones(users, dtype=torch.long),
                  timestamps=history * 100, target_timestamps=None)
    shapes = []

    def predict(h, n, ts):
        shapes.append((tuple(h.shape), tuple(n.shape), tuple(ts.shape)))
        row = h.sum(dim=1) + 1000 * n + ts[:, 0]
        return torch.stack([row, row + 1], dim=1), torch.stack([row, -row], dim=1).float()

    ids, scores = predict_top_k(predict, split, 4, torch.device("cpu"))
    assert shapes == [((4, length), (4,), (4, length))] * 3
    expected = history.sum(dim=1) + 1000 * lengths + history[:, 0] * 100
    assert ids.tolist() == torch.stack([expected, expected + 1], dim=1).tolist()
    assert scores[:, 1].tolist() == (-expected).float().tolist()
    # a split smaller than the batch is called at its own size, unpadded
    shapes.clear()
    predict_top_k(predict, split, 64, torch.device("cpu"))
    assert shapes == [((users, length), (users,), (users, length))]
