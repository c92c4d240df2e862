"""The per-user encoder-state cache (pipeline.serving.kvcache): answers equal the retriever's, tiers evict
LRU and spill device -> host within their budgets, stale prefixes recompute, concurrent requests stay exact."""
import threading

import numpy as np
import pytest
import torch

from pipeline.models import HSTU, Retriever, SASRec
from pipeline.serving.kvcache import IncrementalRetriever, KVCache

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


@pytest.mark.parametrize("time_bias,page_size", [(False, 64), (True, 64), (False, 3), (True, 5)])
def test_returning_users_get_the_retrievers_answer(time_bias, page_size):
    """Random visits (1-5 new actions, growing past max_len so the window slides), batches mixing hits,
    misses, users seen twice in one batch and rows without an id; a device tier that holds ~2 users so that
    host hits happen too; pages of a whole history (64 is clamped to max_len) or of a few positions."""
    retriever = _retriever(time_bias=time_bias)
    per_user = IncrementalRetriever(retriever, None).encoder.state_bytes(MAX_LEN)
    cache = KVCache(device_bytes=2 * per_user, host_bytes=3 * per_user, page_size=page_size)
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


def _pool_cache(device_users: int, host_users: int, page_size: int = MAX_LEN, length: int = MAX_LEN):
    """A cache whose device tier holds `device_users` users of `length` actions (whole pages each) and whose
    host tier holds `host_users` of them, and an engine on it."""
    retriever = _retriever()
    probe = KVCache(0, 0, page_size=page_size)
    engine = IncrementalRetriever(retriever, probe)
    pages = -(-length // probe.page_size)
    cache = KVCache(device_users * pages * probe.page_bytes, host_users * engine.bytes_per_user(length),
                    page_size=page_size)
    return retriever, cache, IncrementalRetriever(retriever, cache)


def _visit(engine, user, history):
    batch = _batch([history])
    return engine.recommend_detailed(*batch[:2], [user])


def test_eviction_is_lru_and_spills_device_to_host():
    retriever, cache, engine = _pool_cache(device_users=2, host_users=2, length=3)
    hist = {user: [ord(user) % ITEMS + 1, 3, 4] for user in "abcde"}
    for user in "abc":
        engine.seed(user, np.array(hist[user]))
    assert cache.users("device") == ["b", "c"] and cache.users("host") == ["a"]
    assert _visit(engine, "b", hist["b"])[2] == ["device_hit"]     # b becomes the most recent
    engine.seed("d", np.array(hist["d"]))
    assert cache.users("device") == ["b", "d"] and cache.users("host") == ["a", "c"]
    engine.seed("e", np.array(hist["e"]))                          # b spills; a, the host's LRU, is dropped
    assert cache.users("device") == ["d", "e"] and cache.users("host") == ["c", "b"]
    ids, scores, paths = _visit(engine, "c", hist["c"] + [9])      # a host hit moves c back, spilling d
    assert paths == ["host_hit"]
    _check_same(retriever, (ids, scores), *_batch([hist["c"] + [9]])[:2])
    assert cache.users("device") == ["e", "c"] and cache.users("host") == ["b", "d"]
    stats = cache.stats()
    assert (stats["hits_device"], stats["hits_host"], stats["evictions_device"], stats["evictions_host"]) == (1, 1, 4, 1)
    assert _visit(engine, "a", hist["a"])[2] == ["miss"] and cache.stats()["misses"] == 1
    # What spilled and came back is what a recompute gives.
    ids, scores, paths = _visit(engine, "d", hist["d"] + [7, 8])
    assert paths == ["host_hit"]
    _check_same(retriever, (ids, scores), *_batch([hist["d"] + [7, 8]])[:2])


def test_budgets_hold_under_random_traffic():
    """Users of random lengths come and go: the pool is allocated once within the device budget, the pages
    entries hold never overlap and never pass it, host bytes never pass theirs, every answer is exact."""
    retriever = _retriever()
    cache = KVCache(device_bytes=0, host_bytes=0, page_size=4)
    IncrementalRetriever(retriever, cache)
    device_budget = 7 * cache.page_bytes + cache.page_bytes // 2     # 7 pages and a half: 7 pages
    cache = KVCache(device_bytes=device_budget, host_bytes=3 * IncrementalRetriever(retriever, None).encoder.state_bytes(8),
                    page_size=4)
    engine = IncrementalRetriever(retriever, cache)
    rng = np.random.default_rng(1)
    users = {u: [] for u in range(10)}
    for step in range(60):
        picked = list(dict.fromkeys(rng.choice(10, size=int(rng.integers(1, 4))).tolist()))
        for u in picked:
            if rng.random() < 0.15:
                users[u] = []                              # a user who starts over: a stale entry
            users[u] += rng.integers(1, ITEMS + 1, int(rng.integers(1, 5))).tolist()
        history, lengths, _ = _batch([users[u] for u in picked])
        got = engine.recommend(history, lengths, picked)
        _check_same(retriever, got, history, lengths)
        assert cache.pool_bytes() <= device_budget
        device, host = cache.users("device"), cache.users("host")
        assert not set(device) & set(host)
        pages = [p for u in device for p in cache.pages_of(u)]
        assert len(pages) == len(set(pages)) and all(0 <= p < cache.num_pages for p in pages)
        stats = cache.stats()
        assert stats["bytes_device"] == len(pages) * cache.page_bytes <= device_budget
        assert stats["bytes_host"] <= cache.budget["host"]
        assert stats["entries_device"] == len(device) and stats["entries_host"] == len(host)
    assert cache.pool_bytes() > 0 and cache.num_pages == 7
    assert cache.stats()["evictions_device"] > 0 and cache.stats()["evictions_host"] > 0


def test_entries_larger_than_a_tier_skip_it():
    retriever, cache, engine = _pool_cache(device_users=1, host_users=1, page_size=4, length=8)
    engine.seed("big", np.arange(1, 12))                     # 11 actions: 3 pages (the device tier has 2), and
    assert cache.tier_of("big") is None and cache.stats()["too_large"] == 1   # more bytes than the host tier
    engine.seed("small", np.arange(1, 6))
    assert cache.tier_of("small") == "device"
    ids, scores, paths = _visit(engine, "long", list(range(1, 12)))    # a miss too large for both: not kept
    assert paths == ["miss"] and cache.tier_of("long") is None and cache.stats()["too_large"] == 2
    _check_same(retriever, (ids, scores), *_batch([list(range(1, 12))])[:2])
    # Too large for the device tier only: kept on the host, and hits there (read from the host state).
    retriever, cache, engine = _pool_cache(device_users=1, host_users=2, page_size=4, length=8)
    engine.seed("mid", np.arange(1, 12))
    assert cache.tier_of("mid") == "host"
    ids, scores, paths = _visit(engine, "mid", list(range(1, 13)))
    assert paths == ["host_hit"] and cache.tier_of("mid") == "host" and cache.state("mid").length == 12
    _check_same(retriever, (ids, scores), *_batch([list(range(1, 13))])[:2])
    assert cache.stats()["too_large"] == 0


def test_pages_reused_after_eviction_give_exact_answers():
    """A pool of two users' pages, six users taking turns: every page is handed out again and again; each
    user's next visit (a host hit or a miss) answers what a full recompute does."""
    retriever, cache, engine = _pool_cache(device_users=2, host_users=1, page_size=4)
    rng = np.random.default_rng(5)
    users = {u: rng.integers(1, ITEMS + 1, 3).tolist() for u in range(6)}
    owners: dict[int, set] = {}
    for step in range(30):
        u = step % 6 if step < 18 else int(rng.integers(0, 6))
        users[u] = (users[u] + rng.integers(1, ITEMS + 1, int(rng.integers(1, 3))).tolist())[-MAX_LEN:]
        ids, scores, paths = _visit(engine, u, users[u])
        _check_same(retriever, (ids, scores), *_batch([users[u]])[:2])
        for page in cache.pages_of(u):
            owners.setdefault(page, set()).add(u)
    assert all(len(who) >= 3 for who in owners.values())      # pages changed hands
    assert set(owners) == set(range(cache.num_pages))


def test_appends_across_page_boundaries_write_in_place_and_into_new_pages():
    retriever, cache, engine = _pool_cache(device_users=3, host_users=0, page_size=4)
    history = [5, 6, 7]
    engine.recommend(*_batch([history])[:2], [1])
    first = cache.pages_of(1)
    assert len(first) == 1
    for add in ([8], [9, 10], [11, 12, 13, 14, 15], [16]):     # 4 (fills the page), 6, 11 (two pages more), 12
        before = cache.state(1)
        history = history + add
        ids, scores, paths = engine.recommend_detailed(*_batch([history])[:2], [1])
        assert paths == ["device_hit"]
        _check_same(retriever, (ids, scores), *_batch([history])[:2])
        pages = cache.pages_of(1)
        assert pages[0] == first[0] and len(pages) == -(-len(history) // 4)
        state = cache.state(1)
        assert state.length == len(history)
        torch.testing.assert_close(state.keys[:, : before.length], before.keys, atol=0, rtol=0)
    # The state in the pages is the full recompute's.
    fresh = IncrementalRetriever(retriever, None).encoder.encode([None], [torch.tensor(history)])[1][0]
    torch.testing.assert_close(cache.state(1).keys, fresh.keys, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cache.state(1).values, fresh.values, atol=1e-5, rtol=1e-4)


def test_a_user_in_several_rows_of_one_batch_uses_the_cache_once():
    retriever, cache, engine = _pool_cache(device_users=4, host_users=0, page_size=4)
    engine.recommend(*_batch([[4, 5, 6]])[:2], [7])
    histories = [[4, 5, 6, 7], [4, 5, 6, 7, 8, 9], [1, 2], [4, 5, 6, 7, 8]]
    history, lengths, _ = _batch(histories)
    ids, scores, paths = engine.recommend_detailed(history, lengths, [7, 7, 7, 3])
    assert paths == ["device_hit", "miss", "miss", "miss"]
    _check_same(retriever, (ids, scores), history, lengths)
    state = cache.state(7)  # the first row's state, the only one written
    assert state.length == 4 and cache.stats()["entries_device"] == 2
    ids, scores, paths = engine.recommend_detailed(*_batch([histories[1]])[:2], [7])
    assert paths == ["device_hit"]
    _check_same(retriever, (ids, scores), *_batch([histories[1]])[:2])


def test_a_batch_larger_than_the_pool_stays_exact():
    """More users in one batch than the pool holds: no page of the batch is reused within it; the rows
    that find no page keep their state in the host tier; with the device tier off everything is host hits."""
    retriever = _retriever()
    for device_users in (2, 0):
        _, cache, engine = _pool_cache(device_users=device_users, host_users=12, page_size=4, length=3)
        users = list(range(6))
        histories = [[u + 1, u + 2, u + 3] for u in users]
        engine.recommend(*_batch(histories)[:2], users)
        assert cache.stats()["entries_device"] == min(device_users, 6)
        histories = [h + [9, 10] for h in histories]
        history, lengths, _ = _batch(histories)
        ids, scores, paths = engine.recommend_detailed(history, lengths, users)
        _check_same(retriever, (ids, scores), history, lengths)
        assert "miss" not in paths
        assert paths.count("host_hit") == 6 - device_users
        assert cache.stats()["entries_device"] == device_users and cache.stats()["entries_host"] == 6 - device_users
        ids, scores, paths = engine.recommend_detailed(history, lengths, users)
        _check_same(retriever, (ids, scores), history, lengths)
        assert "miss" not in paths
        assert cache.pool_bytes() <= cache.budget["device"]


def test_a_failed_batch_leaves_no_half_written_entry(monkeypatch):
    retriever, cache, engine = _pool_cache(device_users=4, host_users=0, page_size=4)
    engine.recommend(*_batch([[4, 5, 6], [1, 2]])[:2], [1, 2])
    assert cache.stats()["bytes_device"] == 2 * cache.page_bytes

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.encoder, "encode_flat", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.recommend(*_batch([[4, 5, 6, 7, 8], [1, 2, 3]])[:2], [1, 2])
    monkeypatch.undo()
    assert cache.stats()["entries_device"] == 0 and cache.stats()["bytes_device"] == 0   # every page is free
    history, lengths, _ = _batch([[4, 5, 6, 7, 8], [1, 2, 3]])
    ids, scores, paths = engine.recommend_detailed(history, lengths, [1, 2])
    assert paths == ["miss", "miss"]
    _check_same(retriever, (ids, scores), history, lengths)


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


def test_a_cache_serves_one_model_layout_on_the_models_device():
    cache = KVCache(10 ** 6, 0)
    IncrementalRetriever(_retriever(), cache)
    IncrementalRetriever(_retriever(seed=1), cache)            # the same layout: shares the pool (namespaces differ)
    with pytest.raises(ValueError, match="another model layout"):
        IncrementalRetriever(_retriever(time_bias=True), cache)
    with pytest.raises(ValueError, match="device tier is on meta"):
        IncrementalRetriever(_retriever(), KVCache(10 ** 6, 0, "meta"))
    assert cache.pool_bytes() == 0                              # allocated at the first use only


def test_warm_graphs_prepares_the_served_shapes_and_leaves_the_cache_as_it_was():
    """At load the engine runs throwaway returning users through its own cache, so that the CUDA graphs of
    every power-of-two batch (misses, and hits appending 1 or 2 actions) exist before the first request; the
    throwaway users and their counts are gone after, and real users are answered exactly. (Forced on the CPU,
    where the padded calls run eagerly and the shapes are recorded all the same.)"""
    retriever = _retriever()
    per_user = IncrementalRetriever(retriever, None).encoder.state_bytes(MAX_LEN)
    cache = KVCache(device_bytes=40 * per_user, host_bytes=0, page_size=4)
    engine = IncrementalRetriever(retriever, cache, namespace="m1")
    engine.encoder.graphs.coarse = True  # the CUDA graphs' shapes: rows and new positions
    counters = dict(cache.counters)
    assert engine.warm_graphs(4, appends=(1, 2)) == 0  # nothing to capture on the CPU
    shapes = engine.warm_graphs(4, appends=(1, 2), force=True)
    # rows 1, 2, 4; new positions: the misses' 6 per row (8, 16, 32 padded) and the hits' 1 or 2 per row
    assert {key[:2] for key in engine.encoder.graphs._buckets} == {
        (1, 8), (1, 1), (1, 2), (2, 16), (2, 2), (2, 4), (4, 32), (4, 4), (4, 8)}
    assert shapes == 9
    assert cache.stats()["entries_device"] == 0 and cache.stats()["bytes_device"] == 0
    assert cache.counters == counters
    history, lengths, _ = _batch([[5, 6, 7], [8, 9]])
    _check_same(retriever, engine.recommend(history, lengths, [1, 2]), history, lengths)
    history, lengths, _ = _batch([[5, 6, 7, 10], [8, 9, 11]])
    _check_same(retriever, engine.recommend(history, lengths, [1, 2]), history, lengths)
    assert cache.stats()["hits_device"] == 2
