"""Per-user encoder state across requests (incremental inference, docs/INCREMENTAL.md).

A returning user brings a few new actions on top of a history the server has encoded before. KVCache keeps
each user's per-layer keys and values, the last query and (with a time bias) the actions' timestamps in two
tiers:

- the device tier is a paged pool on the model's device: one keys tensor and one values tensor of
  `num_pages x page_size` positions each (plus a query slot per page and, with a time bias, the positions'
  timestamps), sized from the device byte budget and allocated once, at the first use. A user's entry is a
  list of page ids and a length; an append writes the new positions into the user's last, partly filled page
  and into fresh pages. The attention reads every row's cached keys in place through a page table (the
  reference kernels, and batches holding host states, gather them first) and a batch writes every row's new
  keys with one scatter per tensor (IncrementalRetriever.recommend);
- the host tier keeps contiguous per-user tensors (pinned memory when CUDA is available, so copies back are
  asynchronous) within its own byte budget.

Both evict the least recently used user; what the device tier evicts spills to the host tier, what the host
tier evicts is dropped; a host hit copies the user back into fresh device pages. An entry larger than a
tier's budget is not stored there.

The protocol stays the stateless one: clients send the full history (and a user id). An entry is used only
when its namespace (the model and precision that computed it) equals the request's and the item ids (and
timestamps, with a time bias) it encodes equal the same-length prefix of the request's history, compared
exactly on host copies kept with the entry. A stale entry (history edited, window slid past max_len) or
another user's can therefore never change an answer, only its cost: it is a miss, the full history is
encoded, and the cache is re-seeded.

IncrementalRetriever.recommend is what the serving engine calls: the retriever's answer for the same
inputs, with hits, misses, rows without a user id and any number of new actions in one batch.

Thread safety: one lock is held across a batch's lookup, encode and write-back (the device runs one batch
at a time on one stream anyway), and by every other method; so a batch's pages are never evicted or reused
while it runs. A user id that appears in several rows of one batch uses the cache in its first row only;
the other rows encode their whole history and write nothing.

Needs torch only (the bench imports it on bare GPU hosts).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.models.incremental import IncrementalEncoder, PinnedStaging, UserState, unsupported_reason
from pipeline.models.retrieval import Retriever, l2_normalize

DEVICE_TIER, HOST_TIER = "device", "host"
# Per-row paths recommend_detailed reports (and the engine's latency metrics are labelled by).
PATHS = ("device_hit", "host_hit", "miss", "no_user")
DEFAULT_PAGE_SIZE = 64


@dataclass(frozen=True)
class Layout:
    """What the pool holds per position, from the model: a cache serves models of one layout."""

    num_layers: int
    heads: int
    attn_dim: int
    hidden_dim: int
    dim: int
    dtype: torch.dtype
    time_bias: bool
    max_len: int

    @classmethod
    def of(cls, encoder: IncrementalEncoder) -> Layout:
        return cls(encoder.num_layers, encoder.heads, encoder.attn_dim, encoder.hidden_dim,
                   encoder.model.item_embedding.embedding_dim, encoder.dtype, bool(encoder.model.time_bias),
                   encoder.max_len)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def position_bytes(self) -> int:
        """Keys and values of one position in every layer (and its timestamp, with a time bias)."""
        kv = self.num_layers * self.heads * (self.attn_dim + self.hidden_dim) * self.element_size
        return kv + (8 if self.time_bias else 0)

    def state_bytes(self, length: int) -> int:
        """A contiguous state of `length` positions (IncrementalEncoder.state_bytes): what the host tier counts."""
        return length * self.position_bytes + self.dim * self.element_size


class _Entry:
    """A user's cached prefix: its length, the namespace and the host copies of its item ids (and timestamps)
    that a request's prefix is compared against, and where its keys live: `pages` of the device pool, or a
    contiguous `state` on the host. nbytes: what it costs its tier's budget."""

    __slots__ = ("namespace", "length", "items", "times", "pages", "state", "nbytes")

    def __init__(self, namespace: bytes, length: int, items: bytes, times: bytes | None,
                 pages: np.ndarray | None = None, state: UserState | None = None, nbytes: int = 0) -> None:
        self.namespace, self.length, self.items, self.times = namespace, length, items, times
        self.pages, self.state, self.nbytes = pages, state, nbytes


def _to_device(array: np.ndarray, device: torch.device) -> Tensor:
    """One host -> device copy of an int64 array: through pinned memory, asynchronous, on CUDA (the caching
    host allocator keeps the pinned block until the copy is done)."""
    host = torch.from_numpy(array)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


_EMPTY = np.empty(0, dtype=np.int64)  # read-only use: never written into
_EMPTY.flags.writeable = False


def _ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges [starts[i], ends[i]): (i, position) of each of their elements, in order."""
    counts = ends - starts
    which = np.repeat(np.arange(len(counts)), counts)
    first = np.cumsum(counts) - counts
    return which, np.arange(int(counts.sum())) - first[which] + starts[which]


def _slots(flat: np.ndarray, table_start: np.ndarray, firsts: np.ndarray, lasts: np.ndarray,
           page_size: int) -> np.ndarray:
    """Pool slots (page * page_size + offset) of positions [firsts[i], lasts[i]) of the users whose page tables
    start at flat[table_start[i]], concatenated in order."""
    if not len(firsts):
        return _EMPTY
    which, pos = _ranges(firsts, lasts)
    return flat[table_start[which] + pos // page_size] * page_size + pos % page_size


def _user_slots(pages: np.ndarray, length: int, page_size: int) -> np.ndarray:
    """Pool slots of one user's positions 0..length-1 in its pages."""
    return _slots(pages, np.zeros(1, np.int64), np.zeros(1, np.int64), np.array([length]), page_size)


class _Pool:
    """The device tier's tensors: keys [L, num_pages * page_size, H, attn_dim], values [.., hidden_dim], the
    query of each entry in the slot of its first page [num_pages, dim], timestamps [num_pages * page_size]."""

    def __init__(self, layout: Layout, num_pages: int, page_size: int, device: torch.device) -> None:
        L, H, P = layout.num_layers, layout.heads, num_pages * page_size
        self.keys = torch.empty(L, P, H, layout.attn_dim, dtype=layout.dtype, device=device)
        self.values = torch.empty(L, P, H, layout.hidden_dim, dtype=layout.dtype, device=device)
        self.queries = torch.empty(num_pages, layout.dim, dtype=layout.dtype, device=device)
        self.times = torch.empty(P, dtype=torch.long, device=device) if layout.time_bias else None
        # The same memory by page: [L, num_pages, page_size, H, d], what a batch gathers.
        self.key_pages = self.keys.view(L, num_pages, page_size, H, layout.attn_dim)
        self.value_pages = self.values.view(L, num_pages, page_size, H, layout.hidden_dim)

    @property
    def nbytes(self) -> int:
        tensors = [self.keys, self.values, self.queries] + ([self.times] if self.times is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


class KVCache:
    """Two LRU tiers of user state by user id, each within its byte budget (0 turns a tier off): a paged pool
    on `device` and contiguous tensors on the host. page_size: positions per page (at most the model's
    max_len)."""

    def __init__(self, device_bytes: int, host_bytes: int, device: torch.device | str = "cpu",
                 pin: bool | None = None, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        if device_bytes < 0 or host_bytes < 0:
            raise ValueError(f"cache budgets must be >= 0 bytes; got device {device_bytes}, host {host_bytes}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1 position; got {page_size}")
        self.device = torch.device(device)
        self.budget = {DEVICE_TIER: int(device_bytes), HOST_TIER: int(host_bytes)}
        # Pinned host memory makes host -> GPU copies asynchronous; it exists only with CUDA.
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.requested_page_size = int(page_size)
        self.layout: Layout | None = None
        self.page_size = self.page_bytes = self.num_pages = 0
        self._pool: _Pool | None = None
        self._free: list[int] = []
        self._tiers: dict[str, OrderedDict[Hashable, _Entry]] = {DEVICE_TIER: OrderedDict(), HOST_TIER: OrderedDict()}
        self._host_bytes = 0
        self._lock = threading.RLock()
        self._staging = PinnedStaging(self.device)  # a batch's index arrays, on their way to the device
        self.counters = {"hits_device": 0, "hits_host": 0, "misses": 0, "stale": 0, "evictions_device": 0,
                         "evictions_host": 0, "too_large": 0}

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device | str) -> KVCache | None:
        """serving.cache (enabled, gpu_bytes, host_bytes, page_size) -> a cache, or None when disabled."""
        if not cfg.get("enabled", True):
            return None
        return cls(int(cfg.get("gpu_bytes", 0)), int(cfg.get("host_bytes", 0)), device,
                   page_size=int(cfg.get("page_size", DEFAULT_PAGE_SIZE)))

    def bind(self, layout: Layout, device: torch.device | None = None) -> None:
        """Fix what one position holds (IncrementalRetriever does, from its model on `device`, which must be the
        cache's); the pool's size follows: as many pages as the device budget pays for, a page costing
        page_size positions and a query."""
        same = device is None or device == self.device or (
            device.type == self.device.type and None in (device.index, self.device.index))
        if not same:
            raise ValueError(f"the cache's device tier is on {self.device} and the model on {device}: give the "
                             "cache the model's device")
        with self._lock:
            if self.layout is not None:
                if layout != self.layout:
                    raise ValueError(f"this cache holds states of another model layout ({self.layout}); "
                                     f"give {layout} a cache of its own")
                return
            self.layout = layout
            self.page_size = max(1, min(self.requested_page_size, layout.max_len))
            self.page_bytes = self.page_size * layout.position_bytes + layout.dim * layout.element_size
            self.num_pages = self.budget[DEVICE_TIER] // self.page_bytes
            self._free = list(range(self.num_pages - 1, -1, -1))  # pops page 0 first

    def pool_bytes(self) -> int:
        """Bytes the device pool has allocated (0 before its first use): never more than the device budget."""
        return self._pool.nbytes if self._pool is not None else 0

    def stats(self) -> dict[str, int]:
        """Counters since creation, and bytes and entries held per tier now (device bytes: whole pages)."""
        with self._lock:
            return {**self.counters, "bytes_device": (self.num_pages - len(self._free)) * self.page_bytes,
                    "bytes_host": self._host_bytes, "entries_device": len(self._tiers[DEVICE_TIER]),
                    "entries_host": len(self._tiers[HOST_TIER])}

    def tier_of(self, user: Hashable) -> str | None:
        with self._lock:
            return next((t for t, entries in self._tiers.items() if user in entries), None)

    def users(self, tier: str) -> list[Hashable]:
        """Users of a tier, least recently used first."""
        with self._lock:
            return list(self._tiers[tier])

    def pages_of(self, user: Hashable) -> list[int]:
        """The device pages a user's entry occupies, in position order ([] when not on the device)."""
        with self._lock:
            entry = self._tiers[DEVICE_TIER].get(user)
            return [] if entry is None else entry.pages.tolist()

    def state(self, user: Hashable) -> UserState | None:
        """A contiguous copy of the user's cached state (on the device for the device tier, else on the host),
        without counting a hit or touching the LRU order; None when the user has no entry."""
        with self._lock:
            entry = self._tiers[DEVICE_TIER].get(user)
            if entry is not None:
                return self._gather(entry)
            entry = self._tiers[HOST_TIER].get(user)
            if entry is None:
                return None
            if self.device.type == "cuda":  # the spill's copy to the host may still be running
                torch.cuda.current_stream(self.device).synchronize()
            return entry.state

    def put_state(self, user: Hashable, state: UserState, items: np.ndarray, timestamps: np.ndarray | None = None,
                  namespace: bytes = b"", tier: str = DEVICE_TIER) -> None:
        """Store a user's state (replacing any entry it has): `items` [state.length] (and `timestamps`) are the
        actions it encodes, `namespace` that of the model that computed it (IncrementalRetriever.namespace).
        tier="device" writes it into pool pages, spilling LRU users to the host (an entry larger than the
        device tier goes to the host tier, one larger than both is not kept); tier="host" stores it in the
        host tier directly (to warm it, or to measure host hits)."""
        if tier not in self.budget:
            raise ValueError(f"unknown cache tier '{tier}'; valid choices: {DEVICE_TIER}, {HOST_TIER}")
        layout = self._layout()
        items = np.ascontiguousarray(items, dtype=np.int64)
        if items.shape != (state.length,) or (layout.time_bias and timestamps is None):
            raise ValueError(f"a state of {state.length} positions needs {state.length} item ids"
                             + (" and timestamps" if layout.time_bias else "") + f"; got {items.shape}")
        times = np.ascontiguousarray(timestamps, dtype=np.int64).tobytes() if layout.time_bias else None
        with self._lock:
            self._remove(user)
            pages = self._allocate(self._pages_for(state.length), {user}) if tier == DEVICE_TIER else None
            if pages is None:
                self._store_host(user, namespace, items.tobytes(), times, state, count_too_large=True)
                return
            pool = self._ensure_pool()
            slots = _to_device(_user_slots(pages, state.length, self.page_size), self.device)
            pool.keys.index_copy_(1, slots, state.keys.to(self.device, non_blocking=True))
            pool.values.index_copy_(1, slots, state.values.to(self.device, non_blocking=True))
            pool.queries[int(pages[0])] = state.query.to(self.device, non_blocking=True)
            if pool.times is not None:
                pool.times.index_copy_(0, slots, state.timestamps.to(self.device, non_blocking=True))
            self._tiers[DEVICE_TIER][user] = _Entry(namespace, state.length, items.tobytes(), times, pages=pages,
                                                    nbytes=len(pages) * self.page_bytes)

    def invalidate(self, user: Hashable) -> None:
        with self._lock:
            self._remove(user)

    def clear(self) -> None:
        with self._lock:
            for user in list(self._tiers[DEVICE_TIER]):
                self._remove(user)
            self._tiers[HOST_TIER].clear()
            self._host_bytes = 0

    # Callers hold the lock.
    def _layout(self) -> Layout:
        if self.layout is None:
            raise ValueError("the cache has no model layout yet: IncrementalRetriever(retriever, cache) binds it")
        return self.layout

    def _ensure_pool(self) -> _Pool:
        if self._pool is None:
            self._pool = _Pool(self._layout(), self.num_pages, self.page_size, self.device)
        return self._pool

    def _pages_for(self, length: int) -> int:
        return -(-length // self.page_size)

    def _matches(self, entry: _Entry, namespace: bytes, items: np.ndarray, times: np.ndarray | None) -> bool:
        """Does the entry encode a prefix of this request's actions (items [n], times [n] or None)?"""
        c = entry.length
        return (c <= len(items) and entry.namespace == namespace and entry.items == items[:c].tobytes()
                and (entry.times is None or entry.times == times[:c].tobytes()))

    def _remove(self, user: Hashable) -> None:
        entry = self._tiers[DEVICE_TIER].pop(user, None)
        if entry is not None:
            self._free.extend(entry.pages.tolist())
        entry = self._tiers[HOST_TIER].pop(user, None)
        if entry is not None:
            self._host_bytes -= entry.nbytes

    def _allocate(self, count: int, protect: set) -> np.ndarray | None:
        """`count` free pages, evicting (spilling) the device tier's LRU users outside `protect` as needed;
        None when that cannot free enough."""
        if count > self.num_pages:
            return None
        device = self._tiers[DEVICE_TIER]
        while len(self._free) < count:
            victim = next(iter(device), None)
            if victim is None or victim in protect:  # protected users are the most recent ones: none left
                return None
            self._spill(victim)
        pages = np.array(self._free[len(self._free) - count:][::-1], dtype=np.int64)
        del self._free[len(self._free) - count:]
        return pages

    def _spill(self, user: Hashable) -> None:
        entry = self._tiers[DEVICE_TIER].pop(user)
        self.counters["evictions_device"] += 1
        if self._layout().state_bytes(entry.length) <= self.budget[HOST_TIER]:
            self._store_host(user, entry.namespace, entry.items, entry.times, self._gather(entry))
        self._free.extend(entry.pages.tolist())  # after the gather: later writes to them queue behind it

    def _gather(self, entry: _Entry) -> UserState:
        """An entry's pages as one contiguous state on the device."""
        pool = self._ensure_pool()
        slots = _to_device(_user_slots(entry.pages, entry.length, self.page_size), self.device)
        return UserState(pool.keys.index_select(1, slots), pool.values.index_select(1, slots),
                         pool.queries[int(entry.pages[0])].clone(),
                         pool.times.index_select(0, slots) if pool.times is not None else None)

    def _store_host(self, user: Hashable, namespace: bytes, items: bytes, times: bytes | None, state: UserState,
                    count_too_large: bool = False) -> bool:
        nbytes = self._layout().state_bytes(state.length)
        if nbytes > self.budget[HOST_TIER]:
            if count_too_large and self._pages_for(state.length) > self.num_pages:
                self.counters["too_large"] += 1
            return False
        self._remove(user)
        host = self._tiers[HOST_TIER]
        while host and self._host_bytes + nbytes > self.budget[HOST_TIER]:
            _, evicted = host.popitem(last=False)
            self._host_bytes -= evicted.nbytes
            self.counters["evictions_host"] += 1
        host[user] = _Entry(namespace, state.length, items, times, state=self._host_copy(state), nbytes=nbytes)
        self._host_bytes += nbytes
        return True

    def _host_copy(self, state: UserState) -> UserState:
        def move(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if t.device.type == "cpu":
                return t.pin_memory() if self.pin and not t.is_pinned() else t.clone() if t._base is not None else t
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)
            return out.copy_(t, non_blocking=self.pin)
        return UserState(move(state.keys), move(state.values), move(state.query), move(state.timestamps))

    # The batch path (IncrementalRetriever.recommend_detailed).
    def encode_batch(self, encoder: IncrementalEncoder, namespace: bytes, items: np.ndarray, lengths: np.ndarray,
                     times: np.ndarray | None, users: Sequence[Hashable]) -> tuple[Tensor, list[str]]:
        """Each row's query (before the retrieval head's L2 norm) [B, dim] on the device, and its path:
        items [B, W] int64 (row b's actions in items[b, :lengths[b]]), times likewise with a time bias, one
        user id per row (none None). Under the lock from lookup to write-back."""
        with self._lock:
            return _Batch(self, encoder, namespace, items, lengths, times, users).run()


class _Batch:
    """One encode_batch: plan on the host (lookups, page allocation, every index array), one copy of the
    index arrays to the device, then device work: host hits' states into their pages, the encoder reading
    the cached pages in place, one scatter of the new keys into their pages; then the entries are updated.
    Per-row work is plain Python on lists (a few microseconds a row); everything per position is numpy."""

    def __init__(self, cache: KVCache, encoder: IncrementalEncoder, namespace: bytes, items: np.ndarray,
                 lengths: np.ndarray, times: np.ndarray | None, users: Sequence[Hashable]) -> None:
        self.cache, self.encoder, self.namespace = cache, encoder, namespace
        self.items, self.times, self.users = items, times, list(users)
        B = len(self.users)
        self.n = np.asarray(lengths, dtype=np.int64)
        self.n_list: list[int] = self.n.tolist()
        self.c_list = [0] * B                                 # cached positions each row reads
        self.kind: list[str | None] = [None] * B             # the tier they come from
        self.entries: list[_Entry | None] = [None] * B       # the entry read (device or host tier)
        self.tables: list[np.ndarray | None] = [None] * B    # pages after this batch (rows written to the pool)
        self.restore = [False] * B                           # host hits copied back into pool pages
        self.to_host = [False] * B                           # rows whose new state goes to the host tier
        self.firsts: list[int] = []                          # each user's first row
        self.paths = ["miss"] * B
        self.pending: list[np.ndarray] = []                  # pages allocated, not yet in an entry

    def run(self) -> tuple[Tensor, list[str]]:
        self._lookup()
        try:
            self._allocate()
            return self._device_work(), self.paths
        except BaseException:
            # Nothing half-written may survive: the batch's users lose their entries, its pages come back.
            for user in set(self.users):
                self.cache._remove(user)
            free = set(self.cache._free)
            for pages in self.pending:
                self.cache._free.extend(p for p in pages.tolist() if p not in free)
            raise

    def _lookup(self) -> None:
        cache, namespace, items, times = self.cache, self.namespace, self.items, self.times
        device, host = cache._tiers[DEVICE_TIER], cache._tiers[HOST_TIER]
        n_list, c_list, kind, entries, paths = self.n_list, self.c_list, self.kind, self.entries, self.paths
        hits = {DEVICE_TIER: 0, HOST_TIER: 0}
        stale = 0
        seen: set = set()
        for b, user in enumerate(self.users):
            if user in seen:  # a second row of the same user: it recomputes and writes nothing
                continue
            seen.add(user)
            self.firsts.append(b)
            tier, entry = DEVICE_TIER, device.get(user)
            if entry is None:
                tier, entry = HOST_TIER, host.get(user)
                if entry is None:
                    continue
            c = entry.length
            if not (c <= n_list[b] and entry.namespace == namespace and entry.items == items[b, :c].tobytes()
                    and (entry.times is None or entry.times == times[b, :c].tobytes())):
                cache._remove(user)  # stale or foreign: it can only be replaced
                stale += 1
                continue
            hits[tier] += 1
            paths[b] = f"{tier}_hit"
            kind[b], entries[b], c_list[b] = tier, entry, c
            cache._tiers[tier].move_to_end(user)  # the batch's users are the most recent: never evicted by it
        counters = cache.counters
        counters["hits_device"] += hits[DEVICE_TIER]
        counters["hits_host"] += hits[HOST_TIER]
        counters["misses"] += len(self.users) - hits[DEVICE_TIER] - hits[HOST_TIER]
        counters["stale"] += stale
        self.protect = seen

    def _allocate(self) -> None:
        cache, S = self.cache, self.cache.page_size
        n_list, c_list, kind, entries, tables = self.n_list, self.c_list, self.kind, self.entries, self.tables
        for b in self.firsts:
            n, entry = n_list[b], entries[b]
            if kind[b] == DEVICE_TIER:
                if n == c_list[b]:
                    continue
                have, need = len(entry.pages), -(-n // S)
                if need <= have:  # the new positions fit in the last page
                    tables[b] = entry.pages
                    continue
                got = cache._allocate(need - have, self.protect)
                if got is not None:  # else no room for the new positions: the entry keeps its prefix
                    self.pending.append(got)
                    tables[b] = np.concatenate([entry.pages, got])
                continue
            user = self.users[b]
            if kind[b] == HOST_TIER:  # it moves to the device: its host bytes are free for what spills
                cache._remove(user)
            got = cache._allocate(-(-n // S), self.protect)
            if got is None:  # larger than the device tier, or no page left outside this batch
                self.to_host[b] = True
                if kind[b] == HOST_TIER:  # it stays on the host
                    cache._store_host(user, entry.namespace, entry.items, entry.times, entry.state)
                continue
            self.pending.append(got)
            tables[b] = got
            self.restore[b] = kind[b] == HOST_TIER

    def _indexes(self) -> dict[str, np.ndarray]:
        """The batch's index arrays (int64, by name), built on the host; what the device work needs besides
        them is left in attributes. Per row, only the page tables are gathered into one array (a pass over
        the rows); every index is then numpy over the whole batch."""
        S, B = self.cache.page_size, len(self.users)
        kind, entries, tables = self.kind, self.entries, self.tables
        # Each row's page table: as written by this batch, else as cached; all of them in one flat array, row b's
        # from start[b] on.
        table = [t if t is not None else e.pages if e is not None else None for t, e in zip(tables, entries)]
        present = [t for t in table if t is not None]
        sizes = np.array(list(map(len, present)), dtype=np.int64)
        has_table = np.array([t is not None for t in table], dtype=bool)
        flat = np.concatenate(present) if present else _EMPTY
        start = np.zeros(B, dtype=np.int64)
        start[has_table] = np.cumsum(sizes) - sizes
        c, n = np.array(self.c_list, dtype=np.int64), self.n
        restore = np.array(self.restore, dtype=bool)
        pooled = np.array([k == DEVICE_TIER for k in kind], dtype=bool) | restore
        is_active = n > c
        act, zero = np.flatnonzero(is_active), np.flatnonzero(~is_active)
        # Where each row's cached positions are read: pool pages (device hits, host hits copied back), or the
        # host state itself (host hits with no room on the device), appended after the pool's. Whole pages
        # are gathered (an index per page): row b's positions start at c_off[b]; the rest of its last page is
        # never read (the kernel reads c_len[b] keys).
        in_pool = np.flatnonzero(is_active & (c > 0) & pooled)
        transient = np.flatnonzero(is_active & (c > 0) & ~pooled)
        read_pages = -(-c[in_pool] // S)
        which, page = _ranges(np.zeros(len(in_pool), np.int64), read_pages)
        gather = flat[start[in_pool][which] + page]
        c_off = np.zeros(B, dtype=np.int64)
        c_off[in_pool] = (np.cumsum(read_pages) - read_pages) * S
        if len(transient):
            c_off[transient] = len(gather) * S + np.cumsum(c[transient]) - c[transient]
        # New positions, flat in the order of the active rows.
        m_act = n[act] - c[act]
        which, pos = _ranges(c[act], n[act])
        rows = act[which]
        n_off = np.cumsum(m_act) - m_act
        written = np.flatnonzero(np.array([tables[b] is not None for b in act.tolist()], dtype=bool))
        w_rows = act[written]
        all_written = len(written) == len(act)
        restored = np.flatnonzero(restore)
        pooled_zero = zero[pooled[zero]] if len(zero) else _EMPTY

        parts = {
            "items": self.items[rows, pos], "positions": pos, "c_off": c_off[act], "c_len": c[act], "n_off": n_off,
            "m_len": m_act, "last_rows": np.cumsum(m_act) - 1, "active": act, "gather": gather,
            "w_slots": _slots(flat, start[w_rows], c[w_rows], n[w_rows], S),
            "keep": _EMPTY if all_written else
            _ranges(n_off[written], n_off[written] + m_act[written])[1],
            "w_query_slots": flat[start[w_rows]],
            "w_query_rows": written,
            "r_slots": _slots(flat, start[restored], np.zeros(len(restored), np.int64), c[restored], S),
            "r_query_slots": flat[start[restored]],
            "zero": pooled_zero,
            "zero_slots": flat[start[pooled_zero]],
        }
        if self.times is not None:
            parts["ts_new"] = self.times[rows, pos]
        self.active, self.zero, self.transient, self.restored = act, zero.tolist(), transient.tolist(), restored.tolist()
        self.pooled, self.written, self.all_written, self.n_off = pooled.tolist(), written.tolist(), all_written, n_off
        return parts

    def _device_work(self) -> Tensor:
        cache, encoder, S = self.cache, self.encoder, self.cache.page_size
        pool = cache._ensure_pool() if self.pending else cache._pool
        layout = cache._layout()
        device, B, c_list = cache.device, len(self.users), self.c_list
        parts = self._indexes()
        active, transient, restored, written = self.active, self.transient, self.restored, self.written
        all_written, m_act = self.all_written, parts["m_len"]
        # Every cached position in the pool (device hits, host hits copied back, misses): the encoder reads the
        # pages in place, replayed from a CUDA graph (PagedGraphs), which takes its inputs in its own copy.
        graphed = bool(len(active)) and not transient and pool is not None and encoder.graphs.accepts(len(parts["items"]))
        encoder_parts = ("items", "positions", "c_off", "c_len", "n_off", "m_len", "last_rows")
        names = [k for k in parts if not (graphed and k in encoder_parts)]
        sizes = [len(parts[k]) for k in names]
        host = cache._staging.host(sum(sizes))
        np.concatenate([np.asarray(parts[k], dtype=np.int64) for k in names], out=host)
        flat = cache._staging.send(torch.empty(len(host), dtype=torch.long, device=device))
        t = dict(zip(names, torch.split(flat, sizes)))  # one copy to the device, views by name

        # Host hits with room on the device: their states into their new pages (one copy per user).
        done = 0
        for i, b in enumerate(restored):
            state = self.entries[b].state
            idx = t["r_slots"][done: done + c_list[b]]
            done += c_list[b]
            pool.keys.index_copy_(1, idx, state.keys.to(device, non_blocking=True))
            pool.values.index_copy_(1, idx, state.values.to(device, non_blocking=True))
            pool.queries.index_copy_(0, t["r_query_slots"][i: i + 1], state.query.to(device, non_blocking=True)[None])
            if pool.times is not None:
                pool.times.index_copy_(0, idx, state.timestamps.to(device, non_blocking=True))

        queries = torch.empty(B, layout.dim, dtype=layout.dtype, device=device)
        page_table, page_size = None, 0
        if graphed:  # the graph reads the pool through the page table itself
            k_cache = v_cache = ts_cache = None
        elif len(active) and len(parts["gather"]) and not transient:
            # Every cached position is in the pool: the attention reads the pages in place (no gather).
            k_cache, v_cache, ts_cache = pool.keys, pool.values, pool.times
            page_table, page_size = t["gather"], S
        elif len(active):
            L, H = layout.num_layers, layout.heads
            if len(parts["gather"]):  # one gather per tensor: [L, pages x page_size, H, d]
                k_cache = pool.key_pages.index_select(1, t["gather"]).view(L, -1, H, layout.attn_dim)
                v_cache = pool.value_pages.index_select(1, t["gather"]).view(L, -1, H, layout.hidden_dim)
            else:
                k_cache = torch.empty(L, 0, H, layout.attn_dim, dtype=layout.dtype, device=device)
                v_cache = torch.empty(L, 0, H, layout.hidden_dim, dtype=layout.dtype, device=device)
            ts_cache = None
            if layout.time_bias:
                ts_cache = pool.times.view(-1, S).index_select(0, t["gather"]).view(-1) if len(parts["gather"]) \
                    else torch.empty(0, dtype=torch.long, device=device)
            if transient:
                states = [self.entries[b].state for b in transient]
                k_cache = torch.cat([k_cache, *(s.keys.to(device, non_blocking=True) for s in states)], dim=1)
                v_cache = torch.cat([v_cache, *(s.values.to(device, non_blocking=True) for s in states)], dim=1)
                if layout.time_bias:
                    ts_cache = torch.cat([ts_cache, *(s.timestamps.to(device, non_blocking=True) for s in states)])
        if len(active):
            ts_new = t["ts_new"] if layout.time_bias else None
            max_keys, max_queries = int(self.n[active].max()), int(m_act.max())
            if graphed:
                x, k_new, v_new = encoder.graphs.run(
                    pool.keys, pool.values, pool.times, S, {**{k: parts[k] for k in encoder_parts},
                                                            "page_table": parts["gather"], "ts_new": parts.get("ts_new")},
                    max_keys, max_queries)
            else:
                x, k_new, v_new = encoder.encode_flat(
                    k_cache, v_cache, t["items"], t["positions"], t["c_off"], t["c_len"], t["n_off"], t["m_len"],
                    t["last_rows"], max_keys, max_queries, ts_cache, ts_new, page_table, page_size)
            queries.index_copy_(0, t["active"], x)
            if written:  # the new positions into their pages: one scatter per tensor
                src_k, src_v = (k_new, v_new) if all_written else \
                    (k_new.index_select(1, t["keep"]), v_new.index_select(1, t["keep"]))
                pool.keys.index_copy_(1, t["w_slots"], src_k)
                pool.values.index_copy_(1, t["w_slots"], src_v)
                if pool.times is not None:
                    pool.times.index_copy_(0, t["w_slots"], ts_new if all_written else ts_new.index_select(0, t["keep"]))
                pool.queries.index_copy_(0, t["w_query_slots"],
                                         x if all_written else x.index_select(0, t["w_query_rows"]))
            self._host_writes(x, k_new, v_new, ts_new)
        if len(parts["zero"]):  # rows appending nothing: their cached query
            queries.index_copy_(0, t["zero"], pool.queries.index_select(0, t["zero_slots"]))
        for b in self.zero:
            if not self.pooled[b]:  # a host hit without room on the device: its own query
                queries[b] = self.entries[b].state.query.to(device, non_blocking=True)
        self._commit()
        return queries

    def _host_writes(self, x: Tensor, k_new: Tensor, v_new: Tensor, ts_new: Tensor | None) -> None:
        """Rows that found no room in the pool keep their new state in the host tier (one copy per user)."""
        cache = self.cache
        for i, b in enumerate(self.active.tolist()):
            if not self.to_host[b]:
                continue
            n, c = self.n_list[b], self.c_list[b]
            sl = slice(int(self.n_off[i]), int(self.n_off[i]) + n - c)
            keys, values = k_new[:, sl], v_new[:, sl]
            ts = ts_new[sl] if ts_new is not None else None
            if c:  # a host hit's state, extended
                old = self.entries[b].state
                keys = torch.cat([old.keys.to(keys.device), keys], dim=1)
                values = torch.cat([old.values.to(values.device), values], dim=1)
                ts = torch.cat([old.timestamps.to(ts.device), ts]) if ts is not None else None
            cache._store_host(self.users[b], self.namespace, self.items[b, :n].tobytes(),
                              None if self.times is None else self.times[b, :n].tobytes(),
                              UserState(keys, values, x[i], ts), count_too_large=True)

    def _commit(self) -> None:
        cache, namespace, items, times = self.cache, self.namespace, self.items, self.times
        device, page_bytes = cache._tiers[DEVICE_TIER], cache.page_bytes
        for b in self.firsts:
            pages = self.tables[b]
            if pages is None:
                continue
            n = self.n_list[b]
            row_items = items[b, :n].tobytes()
            row_times = None if times is None else times[b, :n].tobytes()
            if self.kind[b] == DEVICE_TIER:
                entry = self.entries[b]
                entry.pages, entry.length, entry.items, entry.times = pages, n, row_items, row_times
                entry.nbytes = len(pages) * page_bytes
            else:
                device[self.users[b]] = _Entry(namespace, n, row_items, row_times, pages=pages,
                                               nbytes=len(pages) * page_bytes)
        self.pending = []  # the entries own the pages now


UserIds = Sequence[Hashable | None] | Tensor | np.ndarray


def _user_list(user_ids: UserIds, batch: int) -> list[Hashable | None]:
    """One id per row; None (or a negative integer, for tensors and arrays) means no id for that row."""
    if isinstance(user_ids, (Tensor, np.ndarray)):
        integer = (user_ids.dtype.kind in "iu" if isinstance(user_ids, np.ndarray)
                   else not (user_ids.dtype.is_floating_point or user_ids.dtype.is_complex or user_ids.dtype == torch.bool))
        if user_ids.ndim != 1 or not integer:
            raise ValueError(f"user_ids must be one integer id per row; got shape {tuple(user_ids.shape)} "
                             f"dtype {user_ids.dtype}")
        ids: list[Hashable | None] = [u if u >= 0 else None for u in user_ids.tolist()]
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

    def __init__(self, retriever: Retriever, cache: KVCache | None, namespace: str = "",
                 cuda_graphs: bool | None = None) -> None:
        self.retriever, self.cache = retriever, cache
        self.reason = unsupported_reason(retriever.encoder)
        # cuda_graphs: replay the cache's batches from CUDA graphs (None: on CUDA; models.incremental.PagedGraphs)
        self.encoder = None if self.reason else IncrementalEncoder(retriever.encoder, cuda_graphs)
        # Entries of another model (or another precision) must never match: the namespace is in every entry.
        self.namespace = f"{namespace}|{type(retriever.encoder).__name__}|{self._dtype()}".encode()
        if self.encoder is not None and cache is not None:
            cache.bind(Layout.of(self.encoder), self.encoder.device)

    def _dtype(self) -> torch.dtype:
        return next(self.retriever.parameters()).dtype

    def bytes_per_user(self, length: int) -> int:
        """What one cached user with `length` actions costs the host tier (0 when nothing is cached); the
        device tier counts whole pages (KVCache.page_bytes each)."""
        return self.encoder.state_bytes(length) if self.encoder else 0

    def seed(self, user: Hashable, items: np.ndarray | Tensor, timestamps: np.ndarray | Tensor | None = None,
             tier: str = DEVICE_TIER) -> None:
        """Encode `items` (a user's actions) and store the state in `tier`, as a request would have left it
        (the bench seeds hits this way)."""
        items = torch.as_tensor(items)
        times = None if timestamps is None else torch.as_tensor(timestamps)
        _, (state,) = self.encoder.encode([None], [items.to(self.encoder.device)],
                                          None if times is None else [times.to(self.encoder.device)])
        self.cache.put_state(user, state, items.cpu().numpy(), None if times is None else times.cpu().numpy(),
                             self.namespace, tier)

    @torch.no_grad()
    def warm_graphs(self, max_batch: int, appends: Sequence[int] = (1, 2, 4, 8), force: bool = False) -> int:
        """Capture at load the CUDA graphs (models.incremental.PagedGraphs) that a served stream of returning
        users needs, so that no request waits for a capture or a kernel's tuning: for every power-of-two batch
        up to max_batch, a batch of misses and batches of hits appending `appends` actions, through this
        cache (its pool is what the graphs read), by throwaway users removed after; the counters are left as
        they were. Nothing to do without graphs (the CPU) unless force. -> the shapes the encoder now holds."""
        if self.encoder is None or self.cache is None or not (self.encoder.graphs.capture or force):
            return 0
        cache, max_len, device = self.cache, self.encoder.max_len, self.encoder.device
        counters = dict(cache.counters)
        time_bias = self.encoder.model.time_bias
        batch = 1
        try:
            while batch <= max(1, max_batch):
                users = [("__genrec_warm__", b) for b in range(batch)]
                for added in appends:
                    if added >= max_len:
                        continue
                    cached = max(1, min(max_len - added, max_len // 2))
                    history = torch.ones(batch, cached + added, dtype=torch.long)
                    times = torch.zeros_like(history) if time_bias else None
                    for user in users:
                        cache.invalidate(user)
                    for length in (cached, cached + added):  # a miss that seeds, then a hit that appends
                        self.queries(history, torch.full((batch,), length, dtype=torch.long), users, times)
                batch *= 2
        finally:
            for b in range(batch):
                cache.invalidate(("__genrec_warm__", b))
            cache.counters.update(counters)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return len(self.encoder.graphs._buckets)

    def recommend(self, history: Tensor, lengths: Tensor, user_ids: UserIds | None = None,
                  timestamps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """history [B, W] int64 right-padded, lengths [B], one user id per row or None -> (ids [B, k], scores)."""
        ids, scores, _ = self.recommend_detailed(history, lengths, user_ids, timestamps)
        return ids, scores

    @torch.no_grad()
    def recommend_detailed(self, history: Tensor, lengths: Tensor, user_ids: UserIds | None = None,
                           timestamps: Tensor | None = None) -> tuple[Tensor, Tensor, list[str]]:
        """recommend(), and each row's path (PATHS: device_hit, host_hit, miss, no_user)."""
        queries, paths = self.queries(history, lengths, user_ids, timestamps)
        ids, scores = self.retriever.rank(queries, history.to(queries.device, non_blocking=True))
        return ids, scores, paths

    @torch.no_grad()
    def queries(self, history: Tensor, lengths: Tensor, user_ids: UserIds | None = None,
                timestamps: Tensor | None = None) -> tuple[Tensor, list[str]]:
        """recommend_detailed() up to the retrieval head's top-K: (queries [B, dim] as Retriever.query gives
        them, on the model's device; each row's path). The inputs may be on the host or on the model's device:
        host tensors save the cache a copy back (it reads the histories on the host)."""
        if history.dim() != 2 or lengths.shape != (history.shape[0],):
            raise ValueError(f"history must be [B, W] and lengths [B]; got {tuple(history.shape)} and "
                             f"{tuple(lengths.shape)}")
        device = next(self.retriever.parameters()).device
        on_device = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        B = history.shape[0]
        if user_ids is None or self.cache is None or self.encoder is None:
            if user_ids is not None:
                _user_list(user_ids, B)
            return self.retriever.query(on_device(history), on_device(lengths), on_device(timestamps)), ["no_user"] * B
        users = _user_list(user_ids, B)
        time_bias = self.encoder.model.time_bias
        if time_bias and timestamps is None:
            raise ValueError("this HSTU was built with time_bias=True and needs timestamps [B, W]")
        lens = lengths.cpu().numpy().astype(np.int64, copy=False)
        if B and (lens.min() < 1 or lens.max() > history.shape[1]):
            raise ValueError(f"lengths must be between 1 and the history width {history.shape[1]}; got {lens.tolist()}")
        hist_host = np.ascontiguousarray(history.cpu().numpy(), dtype=np.int64)
        ts_host = np.ascontiguousarray(timestamps.cpu().numpy(), dtype=np.int64) if time_bias else None
        rows = [b for b in range(B) if users[b] is not None]
        if rows and len(rows) < B:
            hist_host, lens = hist_host[rows], lens[rows]
            ts_host = ts_host[rows] if time_bias else None
        paths = ["no_user"] * B
        queries = None
        if rows:
            encoded, row_paths = self.cache.encode_batch(self.encoder, self.namespace, hist_host, lens, ts_host,
                                                         [users[b] for b in rows])
            encoded = l2_normalize(encoded) if self.retriever.l2_norm else encoded
            if len(rows) == B:  # the common case: every row has a user
                return encoded, row_paths
            queries = torch.empty(B, encoded.shape[1], device=device, dtype=self._dtype())
            queries[rows] = encoded
            for b, path in zip(rows, row_paths):
                paths[b] = path
        others = [b for b in range(B) if users[b] is None]
        if others:  # exactly today's path for rows without a user id
            index = torch.tensor(others, device=device)
            other_q = self.retriever.query(on_device(history)[index], on_device(lengths)[index],
                                           None if timestamps is None else on_device(timestamps)[index])
            if queries is None:
                queries = torch.empty(B, other_q.shape[1], device=device, dtype=other_q.dtype)
            queries[others] = other_q
        if queries is None:  # an empty batch
            queries = self.retriever.query(on_device(history), on_device(lengths), on_device(timestamps))
        return queries, paths
