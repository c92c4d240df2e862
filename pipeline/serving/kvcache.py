"""Per-user encoder state across requests (incremental inference, docs/INCREMENTAL.md).

A returning user brings a few new actions on top of a history the server has encoded before. KVCache keeps
each user's UserState (pipeline.models.incremental: per-layer keys and values, the last query) in two tiers:
a device tier (the model's device, a GPU for hot users) with a byte budget, and a host tier (pinned memory
when CUDA is available, so copies back are asynchronous) with its own. Both evict the least recently used
user; what the device tier evicts spills to the host tier, what the host tier evicts is dropped; a host hit
moves the user back to the device tier. An entry larger than a tier's budget is not stored there.

The protocol stays the stateless one: clients send the full history (and a user id). An entry is used only
when its fingerprint, the length and a hash of the actions it encodes (item ids, timestamps with a time
bias, and the namespace: the model it was computed by), matches the same-length prefix of the request's
history. A stale entry (history edited, window slid past max_len) or another user's can therefore never
change an answer, only its cost: it is a miss, the full history is encoded, and the cache is re-seeded.

IncrementalRetriever.recommend is what the serving engine calls: the retriever's answer for the same
inputs, with hits, misses, rows without a user id and any number of new actions in one batch.

Thread safety: one lock guards the tiers and counters; entries and their tensors are immutable (an append
makes a new entry), so a request that took an entry keeps reading a whole one even if it is evicted or
replaced meanwhile. The budgets bound what the cache holds; a request in flight holds its batch's tensors on
top of them until it returns.

Needs torch only (the bench imports it on bare GPU hosts).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.models.incremental import IncrementalEncoder, UserState, unsupported_reason
from pipeline.models.retrieval import Retriever, l2_normalize

DEVICE_TIER, HOST_TIER = "device", "host"
# Per-row paths recommend_detailed reports (and the engine's latency metrics are labelled by).
PATHS = ("device_hit", "host_hit", "miss", "no_user")


@dataclass(frozen=True)
class Fingerprint:
    """What an entry encodes: its number of actions and a 128-bit BLAKE2b of them (and of the namespace)."""

    length: int
    digest: bytes


def _positions(items: np.ndarray, timestamps: np.ndarray | None) -> np.ndarray:
    """int64 [n] or, with timestamps, [n, 2] (item, time) per position: hashed in position order, so the hash
    of a prefix is a state of the hash of the whole history."""
    items = np.ascontiguousarray(items, dtype=np.int64)
    if timestamps is None:
        return items
    return np.ascontiguousarray(np.stack([items, np.asarray(timestamps, dtype=np.int64)], axis=1))


def fingerprint(items: np.ndarray, timestamps: np.ndarray | None = None, namespace: bytes = b"") -> Fingerprint:
    """items int64 [n] (and their timestamps, for a model with time bias) -> Fingerprint."""
    return HistoryHasher(items, timestamps, namespace).full()


class HistoryHasher:
    """Fingerprints of one request's history: of the prefix a cached entry claims (prefix(n)), then of the
    whole history (full()), hashing each action once: the whole history's hash continues the prefix's."""

    def __init__(self, items: np.ndarray, timestamps: np.ndarray | None = None, namespace: bytes = b"") -> None:
        self.data = _positions(items, timestamps)
        self.length = int(self.data.shape[0])
        self._hasher = hashlib.blake2b(namespace + (b"t" if timestamps is not None else b"i"), digest_size=16)
        self._at = 0

    def _advance(self, n: int) -> None:
        if n < self._at:  # only forward; a shorter prefix restarts from a copy of the namespace state
            raise ValueError("HistoryHasher prefixes must be asked in increasing order")
        self._hasher.update(self.data[self._at: n].tobytes())
        self._at = n

    def prefix(self, n: int) -> Fingerprint | None:
        """The fingerprint of the first n actions; None when the history is shorter than n."""
        if n > self.length:
            return None
        self._advance(n)
        return Fingerprint(n, self._hasher.copy().digest())

    def full(self) -> Fingerprint:
        return self.prefix(self.length)  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class CacheEntry:
    fingerprint: Fingerprint
    state: UserState
    nbytes: int


class KVCache:
    """Two LRU tiers of CacheEntry by user id, each within its byte budget (0 turns a tier off)."""

    def __init__(self, device_bytes: int, host_bytes: int, device: torch.device | str = "cpu",
                 pin: bool | None = None) -> None:
        if device_bytes < 0 or host_bytes < 0:
            raise ValueError(f"cache budgets must be >= 0 bytes; got device {device_bytes}, host {host_bytes}")
        self.device = torch.device(device)
        self.budget = {DEVICE_TIER: int(device_bytes), HOST_TIER: int(host_bytes)}
        # Pinned host memory makes host -> GPU copies asynchronous; it exists only with CUDA.
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._tiers: dict[str, OrderedDict[Hashable, CacheEntry]] = {DEVICE_TIER: OrderedDict(), HOST_TIER: OrderedDict()}
        self._bytes = {DEVICE_TIER: 0, HOST_TIER: 0}
        self._lock = threading.Lock()
        self.counters = {"hits_device": 0, "hits_host": 0, "misses": 0, "stale": 0, "evictions_device": 0,
                         "evictions_host": 0, "too_large": 0}

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device | str) -> KVCache | None:
        """serving.cache (enabled, gpu_bytes, host_bytes) -> a cache, or None when disabled."""
        if not cfg.get("enabled", True):
            return None
        return cls(int(cfg.get("gpu_bytes", 0)), int(cfg.get("host_bytes", 0)), device)

    def stats(self) -> dict[str, int]:
        """Counters since creation, and bytes and entries held per tier now."""
        with self._lock:
            return {**self.counters, "bytes_device": self._bytes[DEVICE_TIER], "bytes_host": self._bytes[HOST_TIER],
                    "entries_device": len(self._tiers[DEVICE_TIER]), "entries_host": len(self._tiers[HOST_TIER])}

    def tier_of(self, user: Hashable) -> str | None:
        with self._lock:
            return next((t for t, entries in self._tiers.items() if user in entries), None)

    def users(self, tier: str) -> list[Hashable]:
        """Users of a tier, least recently used first."""
        with self._lock:
            return list(self._tiers[tier])

    def lookup(self, user: Hashable, history: np.ndarray | HistoryHasher, timestamps: np.ndarray | None = None,
               namespace: bytes = b"") -> tuple[CacheEntry | None, str | None]:
        """The user's entry if it encodes a prefix of the request's history (item ids [n] and timestamps, or a
        HistoryHasher of them), on the device, and the tier it was found in; (None, None) on a miss. A host
        hit moves the entry to the device tier (when it fits there)."""
        hasher = history if isinstance(history, HistoryHasher) else HistoryHasher(history, timestamps, namespace)
        with self._lock:
            tier = next((t for t, entries in self._tiers.items() if user in entries), None)
            entry = self._tiers[tier][user] if tier else None
            if entry is not None:
                valid = hasher.prefix(entry.fingerprint.length) == entry.fingerprint
                if not valid:  # stale or foreign: it can only be replaced
                    self._remove(user)
                    self.counters["stale"] += 1
                    entry = None
            if entry is None:
                self.counters["misses"] += 1
                return None, None
            self.counters[f"hits_{tier}"] += 1
            on_device = CacheEntry(entry.fingerprint, entry.state.to(self.device, non_blocking=True), entry.nbytes)
            if tier == HOST_TIER and entry.nbytes <= self.budget[DEVICE_TIER]:
                self._remove(user)
                self._make_room(DEVICE_TIER, entry.nbytes)
                self._add(DEVICE_TIER, user, on_device)
            else:  # a device hit, or an entry the device tier cannot hold: it stays where it is
                self._tiers[tier].move_to_end(user)
            return on_device, tier

    def put(self, user: Hashable, entry: CacheEntry, tier: str = DEVICE_TIER) -> None:
        """Store (replacing the user's previous entry) in the device tier, spilling its LRU users to the host;
        an entry too large for the device tier goes to the host tier, one too large for both is not kept.
        tier="host" stores it in the host tier directly (to warm it, or to measure host hits)."""
        if tier not in self.budget:
            raise ValueError(f"unknown cache tier '{tier}'; valid choices: {DEVICE_TIER}, {HOST_TIER}")
        with self._lock:
            self._remove(user)
            if tier == HOST_TIER:
                self._to_host(user, entry)
            else:
                self._insert(user, entry)

    def invalidate(self, user: Hashable) -> None:
        with self._lock:
            self._remove(user)

    def clear(self) -> None:
        with self._lock:
            for tier in self._tiers:
                self._tiers[tier].clear()
                self._bytes[tier] = 0

    # Callers hold the lock.
    def _remove(self, user: Hashable) -> None:
        for tier, entries in self._tiers.items():
            entry = entries.pop(user, None)
            if entry is not None:
                self._bytes[tier] -= entry.nbytes

    def _insert(self, user: Hashable, entry: CacheEntry) -> None:
        if entry.nbytes <= self.budget[DEVICE_TIER]:
            self._make_room(DEVICE_TIER, entry.nbytes)
            self._add(DEVICE_TIER, user, entry)
        else:
            self._to_host(user, entry)

    def _to_host(self, user: Hashable, entry: CacheEntry) -> None:
        if entry.nbytes > self.budget[HOST_TIER]:
            self.counters["too_large"] += 1
            return
        self._make_room(HOST_TIER, entry.nbytes)
        state = entry.state.to(torch.device("cpu"), pin=self.pin)
        self._add(HOST_TIER, user, CacheEntry(entry.fingerprint, state, entry.nbytes))

    def _make_room(self, tier: str, nbytes: int) -> None:
        entries = self._tiers[tier]
        while entries and self._bytes[tier] + nbytes > self.budget[tier]:
            victim, evicted = entries.popitem(last=False)
            self._bytes[tier] -= evicted.nbytes
            self.counters[f"evictions_{tier}"] += 1
            if tier == DEVICE_TIER:
                self._to_host(victim, evicted)

    def _add(self, tier: str, user: Hashable, entry: CacheEntry) -> None:
        self._tiers[tier][user] = entry
        self._bytes[tier] += entry.nbytes


UserIds = Sequence[Hashable | None] | Tensor | np.ndarray


def _user_list(user_ids: UserIds, batch: int) -> list[Hashable | None]:
    """One id per row; None (or a negative integer, for tensors and arrays) means no id for that row."""
    if isinstance(user_ids, (Tensor, np.ndarray)):
        integer = (user_ids.dtype.kind in "iu" if isinstance(user_ids, np.ndarray)
                   else not (user_ids.dtype.is_floating_point or user_ids.dtype.is_complex or user_ids.dtype == torch.bool))
        if user_ids.ndim != 1 or not integer:
            raise ValueError(f"user_ids must be one integer id per row; got shape {tuple(user_ids.shape)} "
                             f"dtype {user_ids.dtype}")
        ids: list[Hashable | None] = [int(u) if int(u) >= 0 else None for u in user_ids.tolist()]
    else:
        ids = list(user_ids)
    if len(ids) != batch:
        raise ValueError(f"{len(ids)} user ids for a batch of {batch} histories")
    return ids


class IncrementalRetriever:
    """The retriever's answer, with each returning user's encoder state taken from the cache.

        engine = IncrementalRetriever(retriever, KVCache(gpu_bytes, host_bytes, device))
        ids, scores = engine.recommend(history, lengths, user_ids)      # == retriever(history, lengths)

    Rows whose user id is None (or all rows, user_ids=None) take the retriever's own path, as without a cache.
    An encoder that cannot be encoded incrementally (SASRec) always takes it; `reason` says why.
    """

    def __init__(self, retriever: Retriever, cache: KVCache | None, namespace: str = "") -> None:
        self.retriever, self.cache = retriever, cache
        self.reason = unsupported_reason(retriever.encoder)
        self.encoder = None if self.reason else IncrementalEncoder(retriever.encoder)
        # Entries of another model (or another precision) must never match: the namespace is in every hash.
        self.namespace = f"{namespace}|{type(retriever.encoder).__name__}|{self._dtype()}".encode()

    def _dtype(self) -> torch.dtype:
        return next(self.retriever.parameters()).dtype

    def bytes_per_user(self, length: int) -> int:
        """What one cached user with `length` actions costs the budgets (0 when nothing is cached)."""
        return self.encoder.state_bytes(length) if self.encoder else 0

    def recommend(self, history: Tensor, lengths: Tensor, user_ids: UserIds | None = None,
                  timestamps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """history [B, W] int64 right-padded, lengths [B], one user id per row or None -> (ids [B, k], scores)."""
        ids, scores, _ = self.recommend_detailed(history, lengths, user_ids, timestamps)
        return ids, scores

    @torch.no_grad()
    def recommend_detailed(self, history: Tensor, lengths: Tensor, user_ids: UserIds | None = None,
                           timestamps: Tensor | None = None) -> tuple[Tensor, Tensor, list[str]]:
        """recommend(), and each row's path (PATHS: device_hit, host_hit, miss, no_user)."""
        if history.dim() != 2 or lengths.shape != (history.shape[0],):
            raise ValueError(f"history must be [B, W] and lengths [B]; got {tuple(history.shape)} and "
                             f"{tuple(lengths.shape)}")
        B = history.shape[0]
        if user_ids is None or self.cache is None or self.encoder is None:
            if user_ids is not None:
                _user_list(user_ids, B)
            ids, scores = self.retriever(history, lengths, timestamps)
            return ids, scores, ["no_user"] * B
        users = _user_list(user_ids, B)
        time_bias = self.encoder.model.time_bias
        if time_bias and timestamps is None:
            raise ValueError("this HSTU was built with time_bias=True and needs timestamps [B, W]")
        hist_host = history.cpu().numpy()
        lens = lengths.cpu().tolist()
        if any(not 1 <= n <= history.shape[1] for n in lens):
            raise ValueError(f"lengths must be between 1 and the history width {history.shape[1]}; got {lens}")
        ts_host = timestamps.cpu().numpy() if time_bias else None
        paths = ["no_user"] * B
        rows = [b for b in range(B) if users[b] is not None]
        states, new_items, new_ts, hashers = [], [], [], []
        for b in rows:
            items = hist_host[b, : lens[b]]
            ts = ts_host[b, : lens[b]] if time_bias else None
            hasher = HistoryHasher(items, ts, self.namespace)
            hashers.append(hasher)
            entry, tier = self.cache.lookup(users[b], hasher)
            start = 0 if entry is None else entry.fingerprint.length
            paths[b] = "miss" if entry is None else f"{tier}_hit"
            states.append(None if entry is None else entry.state)
            new_items.append(torch.from_numpy(items[start:].copy()))
            new_ts.append(torch.from_numpy(ts[start:].copy()) if time_bias else None)
        queries = torch.empty(B, self.retriever.encoder.item_embeddings().shape[1], device=history.device,
                              dtype=self._dtype())
        if rows:
            encoded, new_states = self.encoder.encode(states, new_items, new_ts if time_bias else None)
            encoded = l2_normalize(encoded) if self.retriever.l2_norm else encoded
            queries[rows] = encoded.to(queries.device)
            for i, b in enumerate(rows):
                if new_items[i].numel():  # a row appending nothing keeps its entry as it is
                    self.cache.put(users[b], CacheEntry(hashers[i].full(), new_states[i], new_states[i].nbytes))
        others = [b for b in range(B) if users[b] is None]
        if others:  # exactly today's path for rows without a user id
            index = torch.tensor(others, device=history.device)
            queries[others] = self.retriever.query(history[index], lengths[index],
                                                   None if timestamps is None else timestamps[index])
        ids, scores = self.retriever.rank(queries, history)
        return ids, scores, paths
