"""A seeded synthetic dataset with structure a sequential recommender can learn.

Real datasets are large and licensed; this one is small, free and fast, so tests and smoke runs can
train a model and still see it beat a popularity baseline. Its structure:

* Items have Zipf popularity and belong to one of `num_clusters` taste clusters.
* Each user has one cluster. With probability `markov_p` the next item is the fixed successor of
  the previous one (the successors of a cluster form a seeded random cycle, so "what comes next"
  is learnable from the sequence); otherwise it is a popularity-weighted draw from the user's
  cluster, or, rarely, from all items.
* A user never repeats an item, because evaluation removes items already in the history from the
  ranking: a repeated target could never be hit. A candidate already seen is replaced by the next
  unseen item along its successor cycle (then along a global cycle once the cluster is used up).
"""

from dataclasses import dataclass

import numpy as np

from pipeline.data.readers import DataError, Interactions

_GLOBAL_DRAW_P = 0.1  # share of non-successor draws that ignore the user's cluster
_START_TIME = 1_600_000_000  # 2020-09-13, unix seconds
_YEAR_S = 365 * 86_400
_MAX_GAP_S = 3 * 86_400


@dataclass(frozen=True, eq=False)
class _World:
    """The item side of the generator: clusters, popularity and successor cycles (0-based ids)."""

    cluster_keys: (
        np.ndarray
    )  # cluster + within-cluster popularity CDF, ascending, aligned with cluster_items
    cluster_items: np.ndarray  # items grouped by cluster, each cluster in its (random) cycle order
    global_cdf: np.ndarray  # popularity CDF over all items
    successor: np.ndarray  # successor[i]: next item of i's cluster cycle
    global_next: np.ndarray  # one cycle through all items, to escape an exhausted cluster
    max_cluster_size: int


def generate_synthetic(
    num_users: int = 2000,
    num_items: int = 1000,
    min_len: int = 8,
    max_len: int = 60,
    num_clusters: int = 16,
    zipf_a: float = 1.1,
    markov_p: float = 0.6,
    seed: int = 0,
) -> Interactions:
    """Generates `num_users` sequences of `min_len`..`max_len` distinct items, with timestamps.

    The same arguments always give the same data. Item ids are 1..num_items (some may never
    occur); raw ids equal the item ids, raw user ids are 0..num_users-1.
    """
    _check_arguments(num_users, num_items, min_len, max_len, num_clusters, zipf_a, markov_p)
    rng = np.random.default_rng(seed)
    world = _make_world(rng, num_items, num_clusters, zipf_a)
    clusters = rng.integers(num_clusters, size=num_users)
    lengths = rng.integers(min_len, max_len + 1, size=num_users)
    items = _sample_items(rng, world, clusters, lengths, markov_p, num_items)
    gaps = rng.integers(1, _MAX_GAP_S, size=(num_users, max_len))
    times = _START_TIME + rng.integers(_YEAR_S, size=(num_users, 1)) + np.cumsum(gaps, axis=1)
    valid = np.arange(max_len) < lengths[:, None]
    splits = np.cumsum(lengths)[:-1]
    raw_item_ids = np.arange(num_items + 1, dtype=np.int64)
    raw_item_ids[0] = -1
    return Interactions(
        name="synthetic",
        sequences=np.split(items[valid] + 1, splits),
        timestamps=np.split(times[valid], splits),
        num_items=num_items,
        raw_item_ids=raw_item_ids,
        raw_user_ids=np.arange(num_users, dtype=np.int64),
    )


def _check_arguments(
    num_users, num_items, min_len, max_len, num_clusters, zipf_a, markov_p
) -> None:
    problems = []
    if num_users < 1:
        problems.append(f"num_users={num_users} must be >= 1")
    if not 1 <= num_clusters <= num_items:
        problems.append(f"num_clusters={num_clusters} must be in 1..num_items={num_items}")
    if not 1 <= min_len <= max_len <= num_items:
        problems.append(
            f"need 1 <= min_len <= max_len <= num_items (users never repeat an item), "
            f"got min_len={min_len}, max_len={max_len}, num_items={num_items}"
        )
    if zipf_a < 0:
        problems.append(f"zipf_a={zipf_a} must be >= 0 (0 = uniform popularity)")
    if not 0 <= markov_p <= 1:
        problems.append(f"markov_p={markov_p} is a probability and must be in [0, 1]")
    if problems:
        raise DataError("generate_synthetic: " + "; ".join(problems))


def _make_world(
    rng: np.random.Generator, num_items: int, num_clusters: int, zipf_a: float
) -> _World:
    popularity = np.empty(num_items)
    popularity[rng.permutation(num_items)] = (
        np.arange(1, num_items + 1, dtype=np.float64) ** -zipf_a
    )
    cluster_of = np.empty(num_items, dtype=np.int64)
    cluster_of[rng.permutation(num_items)] = np.arange(num_items) % num_clusters

    # Shuffle, then group by cluster: each cluster's items are in random order, which is its cycle.
    shuffled = rng.permutation(num_items)
    cluster_items = shuffled[np.argsort(cluster_of[shuffled], kind="stable")]
    sizes = np.bincount(cluster_of, minlength=num_clusters)
    starts = np.cumsum(sizes) - sizes
    next_position = np.arange(1, num_items + 1)
    ends = starts + sizes - 1
    next_position[ends] = starts
    successor = np.empty(num_items, dtype=np.int64)
    successor[cluster_items] = cluster_items[next_position]

    weights = popularity[cluster_items]
    group_total = np.add.reduceat(weights, starts)
    group_before = np.repeat(np.cumsum(group_total) - group_total, sizes)
    within = (np.cumsum(weights) - group_before) / np.repeat(group_total, sizes)
    cluster_keys = np.repeat(np.arange(num_clusters), sizes) + within
    cluster_keys[ends] = np.arange(num_clusters) + 1.0  # exact upper edge, despite rounding

    by_popularity = np.argsort(-popularity, kind="stable")
    global_next = np.empty(num_items, dtype=np.int64)
    global_next[by_popularity] = np.roll(by_popularity, -1)
    return _World(
        cluster_keys=cluster_keys,
        cluster_items=cluster_items,
        global_cdf=np.cumsum(popularity) / popularity.sum(),
        successor=successor,
        global_next=global_next,
        max_cluster_size=int(sizes.max()),
    )


def _draw_from_clusters(
    rng: np.random.Generator, world: _World, clusters: np.ndarray
) -> np.ndarray:
    # Cluster c owns keys in (c, c+1], so c + U[0, 1) lands in c's popularity CDF.
    position = np.searchsorted(
        world.cluster_keys, clusters + rng.random(len(clusters)), side="right"
    )
    return world.cluster_items[position]


def _draw_global(rng: np.random.Generator, world: _World, size: int) -> np.ndarray:
    position = np.searchsorted(world.global_cdf, rng.random(size), side="right")
    return np.minimum(position, len(world.global_cdf) - 1)


def _sample_items(
    rng: np.random.Generator,
    world: _World,
    clusters: np.ndarray,
    lengths: np.ndarray,
    markov_p: float,
    num_items: int,
) -> np.ndarray:
    """Samples [num_users, max(lengths)] 0-based items, one time step for all users at a time."""
    num_users, max_len = len(clusters), int(lengths.max())
    items = np.zeros((num_users, max_len), dtype=np.int64)
    seen = np.zeros((num_users, num_items), dtype=bool)
    for step in range(max_len):
        users = np.flatnonzero(lengths > step)
        candidates = _draw_from_clusters(rng, world, clusters[users])
        if step > 0:
            anywhere = rng.random(len(users)) < _GLOBAL_DRAW_P
            candidates[anywhere] = _draw_global(rng, world, int(anywhere.sum()))
            follow = rng.random(len(users)) < markov_p
            candidates[follow] = world.successor[items[users[follow], step - 1]]
        candidates = _first_unseen(world, seen, users, candidates)
        items[users, step] = candidates
        seen[users, candidates] = True
    return items


def _first_unseen(
    world: _World, seen: np.ndarray, users: np.ndarray, candidates: np.ndarray
) -> np.ndarray:
    """Walks each seen candidate along its cluster cycle, then the global cycle, to an unseen item.

    A user has seen fewer items than exist (max_len <= num_items), so the global cycle always ends
    the walk.
    """
    pending = np.flatnonzero(seen[users, candidates])
    walked = 0
    while len(pending):
        cycle = world.successor if walked < world.max_cluster_size else world.global_next
        candidates[pending] = cycle[candidates[pending]]
        pending = pending[seen[users[pending], candidates[pending]]]
        walked += 1
    return candidates
