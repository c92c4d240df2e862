"""The per-user encoder-state cache (pipeline.serving.kvcache): answers equal the retriever's, tiers evict
LRU and spill device -> host within their budgets, stale prefixes recompute, concurrent requests stay exact."""
import threading

import numpy as np
import pytest
import torch

from pipeline.models import HSTU, Retriever, SASRec
from pipeline.models.incremental import UserState
from pipeline.serving.kvcache import CacheEntry, IncrementalRetriever, KVCache, fingerprint

MAX_LEN, ITEMS, K = 12, 200, 10


def _retriever(seed: int = 0, time_bias: bool = False) -> Retriever:
    torch.manual_seed(seed)
    model = HSTU(ITEMS, MAX_LEN, dim=16, num_layers=2, num_heads=2, dropout=0.0, linear_dropout=0.0,
                 time_bias=time_bias)
    return Retriever(model, k=K).eval()


def _batch(histories: list[list[int]], times: list[list[int]] | None = None):
    """What a client sends: each history's most recent MAX_LEN actions, right-padded."""
    history = torch.zeros(len(histories), MAX_LEN, dtype=torch.long)
    ts = torch.zeros_like(history)
    for b, h in enumerate(histories):
        window = h[-MAX_LEN:]
        history[b, : len(window)] = torch.tensor(window)
        if times is not None:
            ts[b, : len(window)] = torch.tensor(times[b][-MAX_LEN:])
    lengths = torch.tensor([min(len(h), MAX_LEN) for h in histories])
    return history, lengths, (ts if times is not None else None)


def _check_same(retriever, got, history, lengths, ts=None):
    with torch.no_grad():
        ids, scores = retriever(history, lengths, ts)
    torch.testing.assert_close(got[1], scores, atol=1e-5, rtol=0)
    overlap = (got[0][:, :, None] == ids[:, None, :]).any(-1).float().mean().item()
    assert overlap >= 0.999


@pytest.mark.parametrize("time_bias", [False, True])
def test_returning_users_get_the_retrievers_answer(time_bias):
    """Random visits (1-5 new actions, growing past max_len so the window slides), batches mixing hits,
    misses, users seen twice in one batch and rows without an id; a device tier that holds ~2 users so that
    host hits happen too."""
    retriever = _retriever(time_bias=time_bias)
    per_user = IncrementalRetriever(retriever, None).encoder.state_bytes(MAX_LEN)
    cache = KVCache(device_bytes=2 * per_user, host_bytes=3 * per_user)
    engine = IncrementalRetriever(retriever, cache, namespace="m1")
    rng = np.random.default_rng(0)
    users = {u: [] for u in range(6)}
    clock = {u: 0 for u in range(6)}
    stamps = {u: [] for u in range(6)}
    seen_paths = set()
    for _ in range(14):
        batch_users = list(rng.choice(6, size=4, replace=True))
        for u in set(batch_users):
            n = int(rng.integers(1, 6))
            users[u] += rng.integers(1, ITEMS + 1, n).tolist()
            stamps[u] += (clock[u] + np.cumsum(rng.integers(1, 10 ** 5, n))).tolist()
            clock[u] = stamps[u][-1]
        rows = [*batch_users, None]
        anonymous = rng.integers(1, ITEMS + 1, 7).tolist()
        histories = [users[u] if u is not None else anonymous for u in rows]
        times = [stamps[u] if u is not None else list(range(1, 8)) for u in rows] if time_bias else None
        history, lengths, ts = _batch(histories, times)
        ids, scores, paths = engine.recommend_detailed(history, lengths, [None if u is None else int(u) for u in rows], ts)
        _check_same(retriever, (ids, scores), history, lengths, ts)
        assert paths[-1] == "no_user"
        seen_paths.update(paths)
    assert {"device_hit", "host_hit", "miss"} <= seen_paths
    stats = cache.stats()
    assert stats["stale"] > 0  # the windows slid past max_len
    assert stats["evictions_device"] > 0


def test_eviction_is_lru_and_spills_device_to_host():
    cache = KVCache(device_bytes=200, host_bytes=200)
    entry = lambda tag: _entry(100, tag)  # noqa: E731
    for user in "abc":
        cache.put(user, entry(user))
    assert cache.users("device") == ["b", "c"] and cache.users("host") == ["a"]
    found, tier = cache.lookup("b", np.array([ord("b")]))      # b becomes the most recent
    assert tier == "device" and found is not None
    cache.put("d", entry("d"))
    assert cache.users("device") == ["b", "d"] and cache.users("host") == ["a", "c"]
    cache.put("e", entry("e"))                                  # b spills; a, the host's LRU, is dropped
    assert cache.users("device") == ["d", "e"] and cache.users("host") == ["c", "b"]
    found, tier = cache.lookup("c", np.array([ord("c")]))      # a host hit moves c back, spilling d
    assert tier == "host" and found.state.keys.device == cache.device
    assert cache.users("device") == ["e", "c"] and cache.users("host") == ["b", "d"]
    stats = cache.stats()
    assert (stats["hits_device"], stats["hits_host"], stats["evictions_device"], stats["evictions_host"]) == (1, 1, 4, 1)
    assert cache.lookup("a", np.array([ord("a")])) == (None, None) and cache.stats()["misses"] == 1


def _entry(nbytes: int, tag: str) -> CacheEntry:
    state = UserState(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.zeros(1), None)
    return CacheEntry(fingerprint(np.array([ord(tag)])), state, nbytes)


def test_budgets_hold_under_random_traffic():
    """Bytes held per tier, summed from the users each tier lists, never pass its budget; entries too large
    for a tier skip it."""
    cache = KVCache(device_bytes=1000, host_bytes=1500)
    rng = np.random.default_rng(1)
    sizes = {}
    for step in range(400):
        user = int(rng.integers(0, 30))
        if rng.random() < 0.3:
            cache.lookup(user, np.array([user]))
            continue
        sizes[user] = int(rng.choice([50, 200, 600, 1200, 2000]))
        cache.put(user, CacheEntry(fingerprint(np.array([user])), _entry(1, "x").state, sizes[user]))
        device, host = cache.users("device"), cache.users("host")
        assert not set(device) & set(host)
        assert sum(sizes[u] for u in device) <= 1000 and sum(sizes[u] for u in host) <= 1500
        stats = cache.stats()
        assert stats["bytes_device"] == sum(sizes[u] for u in device)
        assert stats["bytes_host"] == sum(sizes[u] for u in host)
        assert all(sizes[u] <= 1000 for u in device)
    assert cache.stats()["too_large"] > 0          # the 2000-byte entries fit nowhere
    cache.put("big", CacheEntry(fingerprint(np.array([1])), _entry(1, "x").state, 1200))
    assert cache.tier_of("big") == "host"  # too large for the device tier, kept on the host


def test_a_changed_or_foreign_prefix_is_recomputed():
    retriever = _retriever()
    cache = KVCache(10 ** 7, 10 ** 7)
    engine = IncrementalRetriever(retriever, cache, namespace="m1")
    first = _batch([[5, 6, 7, 8]])
    engine.recommend(*first[:2], [1])
    # Same user id, an edited history: must not reuse the state of [5, 6, 7, 8].
    edited = _batch([[5, 9, 7, 8, 10]])
    ids, scores, paths = engine.recommend_detailed(*edited[:2], [1])
    assert paths == ["miss"] and cache.stats()["stale"] == 1
    _check_same(retriever, (ids, scores), *edited[:2])
    # The re-seeded entry serves the edited history's continuation.
    longer = _batch([[5, 9, 7, 8, 10, 11]])
    ids, scores, paths = engine.recommend_detailed(*longer[:2], [1])
    assert paths == ["device_hit"]
    _check_same(retriever, (ids, scores), *longer[:2])
    # Another model sharing the cache never matches this one's entries.
    other = _retriever(seed=1)
    ids, scores, paths = IncrementalRetriever(other, cache, namespace="m2").recommend_detailed(*longer[:2], [1])
    assert paths == ["miss"]
    _check_same(other, (ids, scores), *longer[:2])


def test_same_history_twice_is_a_hit_without_new_actions():
    retriever = _retriever()
    engine = IncrementalRetriever(retriever, KVCache(10 ** 7, 0))
    batch = _batch([[3, 4, 5], [9]])
    engine.recommend(*batch[:2], torch.tensor([7, 8]))
    ids, scores, paths = engine.recommend_detailed(*batch[:2], torch.tensor([7, -1]))
    assert paths == ["device_hit", "no_user"]
    _check_same(retriever, (ids, scores), *batch[:2])


def test_bad_input_and_unsupported_models():
    engine = IncrementalRetriever(_retriever(), KVCache(10 ** 6, 0))
    history, lengths, _ = _batch([[1, 2], [3]])
    with pytest.raises(ValueError, match="1 user ids for a batch of 2"):
        engine.recommend(history, lengths, [1])
    with pytest.raises(ValueError, match="one integer id per row"):
        engine.recommend(history, lengths, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="lengths must be between 1"):
        engine.recommend(history, torch.tensor([0, 1]), [1, 2])
    with pytest.raises(ValueError, match="budgets must be >= 0"):
        KVCache(-1, 0)
    torch.manual_seed(0)
    sasrec = Retriever(SASRec(ITEMS, MAX_LEN, dim=16), k=K).eval()
    fallback = IncrementalRetriever(sasrec, KVCache(10 ** 6, 0))
    assert "HSTU only" in fallback.reason
    ids, scores, paths = fallback.recommend_detailed(history, lengths, [1, 2])
    assert paths == ["no_user", "no_user"]
    _check_same(sasrec, (ids, scores), history, lengths)


def test_concurrent_requests_for_the_same_users_stay_exact():
    """Threads hammer three users with growing and diverging histories over a cache small enough to evict
    constantly; every answer equals the full recompute computed beforehand."""
    retriever = _retriever()
    per_user = IncrementalRetriever(retriever, None).encoder.state_bytes(MAX_LEN)
    cache = KVCache(device_bytes=per_user, host_bytes=per_user)
    engine = IncrementalRetriever(retriever, cache)
    rng = np.random.default_rng(2)
    requests = []
    for user in range(3):
        base = rng.integers(1, ITEMS + 1, 3).tolist()
        for variant in range(2):  # two diverging histories under one id: each invalidates the other's entry
            hist = base + rng.integers(1, ITEMS + 1, 2).tolist() if variant else list(base)
            for _ in range(4):
                hist = hist + rng.integers(1, ITEMS + 1, int(rng.integers(1, 4))).tolist()
                requests.append((user, hist))
    expected = {}
    for user, hist in requests:
        history, lengths, _ = _batch([hist])
        with torch.no_grad():
            expected[(user, tuple(hist))] = retriever(history, lengths)
    errors = []

    def worker(seed: int) -> None:
        order = np.random.default_rng(seed).permutation(len(requests))
        try:
            for i in order:
                user, hist = requests[i]
                history, lengths, _ = _batch([hist])
                ids, scores = engine.recommend(history, lengths, [user])
                want_ids, want_scores = expected[(user, tuple(hist))]
                if not (torch.allclose(scores, want_scores, atol=1e-5, rtol=0) and torch.equal(ids, want_ids)):
                    errors.append((user, hist))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    stats = cache.stats()
    assert stats["hits_device"] + stats["hits_host"] > 0 and stats["stale"] > 0
