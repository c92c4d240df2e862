"""HSTU attention of new queries against a user's cached keys, ragged across the batch (incremental encoding,
pipeline.models.incremental).

Row b of a batch has c_len[b] cached positions (keys and values of earlier requests) followed by n_len[b] new
positions, whose keys and values were just computed; its queries are the last q_len[b] of those
c_len[b] + n_len[b] positions (every new one in the inner layers, the latest alone in the last layer). A
query at absolute position p attends key j when j <= p, with the bias position_weight[j - p + max_len - 1]
(and a time-gap bias, reference only) and silu(.) / max_len: exactly the entries of row p of the full
attention matrix (hstu_attention.py), so the new positions' outputs equal a full recompute's.

Everything is flat ("jagged"): the cached keys of all rows one after another ([sum c_len, H, d], row b's at
c_off[b]), likewise the new keys/values (n_off) and the queries and the output (q_off). No row is padded to
the longest: a batch mixing a 1,000-position hit with a 3-position miss reads 1,003 keys' worth, not 2,000.
q, k and v are SiLU-activated already (the cache stores them so).

Paged: with a page_table (int64 page ids, each row's pages one after another) and page_size > 0, k_cache
and v_cache are a page pool ([num_pages * page_size, H, d], pipeline.serving.kvcache) and the flat cached
row r of the batch is the pool's slot page_table[r // page_size] * page_size + r % page_size; c_off[b] is
then a multiple of page_size (row b's first page in the table, times page_size). The Triton kernel reads
the keys in place; the reference gathers them first.

The Triton kernel (triton_hstu.py, cached_attention) computes the positional bias itself; with a time-gap
bias the reference runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def time_gap_buckets(query_ts: Tensor, key_ts: Tensor, num_buckets: int) -> Tensor:
    """RelativeBias's bucketing of |t_query - t_key| (log base 2 in steps of 0.301, clamped)."""
    gaps = (query_ts.unsqueeze(-1) - key_ts.unsqueeze(-2)).abs().clamp(min=1)
    return (gaps.to(torch.float32).log() / 0.301).long().clamp(0, num_buckets)


def gather_pages(pool: Tensor, page_table: Tensor, page_size: int) -> Tensor:
    """A page pool's pages page_table, one after another: [len(page_table) * page_size, ...]."""
    pages = pool.view(-1, page_size, *pool.shape[1:])
    return pages.index_select(0, page_table).view(-1, *pool.shape[1:])


def _padded_index(offsets: Tensor, counts: Tensor, width: int, fill: int) -> tuple[Tensor, Tensor]:
    """[B, width] flat indices offsets[b] + i for i < counts[b] (fill elsewhere), and that validity mask."""
    i = torch.arange(width, device=offsets.device)
    valid = i.unsqueeze(0) < counts.unsqueeze(1)
    index = torch.where(valid, offsets.unsqueeze(1) + i.unsqueeze(0), torch.full_like(valid, fill, dtype=torch.long))
    return index, valid


def cached_attention_reference(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor,
    c_off: Tensor, c_len: Tensor, n_off: Tensor, n_len: Tensor, q_off: Tensor, q_len: Tensor,
    position_weight: Tensor, max_len: int, max_keys: int, max_queries: int,
    time_weight: Tensor | None = None, ts_cache: Tensor | None = None, ts_new: Tensor | None = None,
    page_table: Tensor | None = None, page_size: int = 0,
) -> Tensor:
    """q [Nq, H, dqk], k_cache [Nc, H, dqk], v_cache [Nc, H, dv], k_new [Nn, H, dqk], v_new [Nn, H, dv];
    c_off .. q_len int64 [B]; max_keys >= max(c_len + n_len), max_queries >= max(q_len) (host ints, the padded
    widths). time_weight with ts_cache [Nc], ts_new [Nn]: add RelativeBias's time-gap bias. -> [Nq, H, dv].
    With a page_table, k_cache/v_cache (and ts_cache) are a page pool: its pages are gathered first.

    Pads the rows to max_keys / max_queries with index tensors (no Python loop over rows), in the model's
    dtype as HSTULayer's reference attention computes."""
    if page_table is not None and page_size > 0:
        k_cache, v_cache = gather_pages(k_cache, page_table, page_size), gather_pages(v_cache, page_table, page_size)
        if ts_cache is not None:
            ts_cache = gather_pages(ts_cache, page_table, page_size)
    B = c_len.shape[0]
    H, dv = v_new.shape[1], v_new.shape[2]
    Nc, Nn = k_cache.shape[0], k_new.shape[0]
    zero_k = k_new.new_zeros(1, *k_new.shape[1:])
    zero_v = v_new.new_zeros(1, *v_new.shape[1:])
    keys = torch.cat([k_cache.to(k_new.dtype), k_new, zero_k])       # the pad index points at the zero row
    values = torch.cat([v_cache.to(v_new.dtype), v_new, zero_v])
    j = torch.arange(max_keys, device=q.device).unsqueeze(0)         # [1, T]
    total = c_len + n_len
    from_cache = j < c_len.unsqueeze(1)
    key_index = torch.where(from_cache, c_off.unsqueeze(1) + j, Nc + n_off.unsqueeze(1) + j - c_len.unsqueeze(1))
    key_valid = j < total.unsqueeze(1)
    key_index = torch.where(key_valid, key_index, torch.full_like(key_index, Nc + Nn))
    q_index, q_valid = _padded_index(q_off, q_len, max_queries, q.shape[0])
    queries = torch.cat([q, q.new_zeros(1, *q.shape[1:])])[q_index]  # [B, M, H, dqk]
    k_pad, v_pad = keys[key_index], values[key_index]                # [B, T, H, d]
    # Query i of row b sits at absolute position total - q_len + i.
    pos = (total - q_len).unsqueeze(1) + torch.arange(max_queries, device=q.device).unsqueeze(0)   # [B, M]
    offsets = (j.unsqueeze(1) - pos.unsqueeze(2) + max_len - 1).clamp(0, 2 * max_len - 2)          # [B, M, T]
    bias = position_weight[offsets]
    if time_weight is not None:
        key_ts = torch.cat([ts_cache, ts_new, ts_new.new_zeros(1)])[key_index]                    # [B, T]
        q_ts_index = torch.where(q_valid, n_off.unsqueeze(1) + pos - c_len.unsqueeze(1),
                                 torch.full_like(pos, Nn))
        q_ts = torch.cat([ts_new, ts_new.new_zeros(1)])[q_ts_index]                               # [B, M]
        bias = bias + time_weight[time_gap_buckets(q_ts, key_ts, time_weight.shape[0] - 1)]
    mask = (j.unsqueeze(1) <= pos.unsqueeze(2)) & key_valid.unsqueeze(1) & q_valid.unsqueeze(2)
    scores = torch.einsum("bihd,bjhd->bhij", queries, k_pad) + bias.unsqueeze(1).to(queries.dtype)
    attn = F.silu(scores) / max_len * mask.unsqueeze(1).to(scores.dtype)
    out = torch.einsum("bhij,bjhd->bihd", attn, v_pad)               # [B, M, H, dv]
    if not B:
        return v_new.new_zeros(q.shape[0], H, dv)
    # Back to the flat query layout by index (not by boolean mask, which would synchronize with the host and
    # keep the call out of a CUDA graph); padded slots land in a spare row, dropped.
    flat = out.new_zeros(q.shape[0] + 1, H, dv)
    flat.index_copy_(0, q_index.reshape(-1), out.reshape(-1, H, dv))
    return flat[: q.shape[0]]


@torch.library.custom_op("genrec::hstu_cached_attention", mutates_args=())
def _cached_attention_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor,
    c_off: Tensor, c_len: Tensor, n_off: Tensor, n_len: Tensor, q_off: Tensor, q_len: Tensor,
    position_weight: Tensor, max_len: int, max_keys: int, max_queries: int, page_table: Tensor, page_size: int,
) -> Tensor:
    from pipeline.kernels.triton_hstu import cached_attention

    return cached_attention(q, k_cache, v_cache, k_new, v_new, c_off, c_len, n_off, n_len, q_off, q_len,
                            position_weight, max_len, max_keys, max_queries, page_table, page_size)


@_cached_attention_triton.register_fake
def _(q, k_cache, v_cache, k_new, v_new, c_off, c_len, n_off, n_len, q_off, q_len, position_weight, max_len,
      max_keys, max_queries, page_table, page_size):
    return v_new.new_empty(q.shape[0], v_new.shape[1], v_new.shape[2])


def hstu_cached_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor,
    c_off: Tensor, c_len: Tensor, n_off: Tensor, n_len: Tensor, q_off: Tensor, q_len: Tensor,
    *, position_weight: Tensor, max_len: int, max_keys: int, max_queries: int,
    time_weight: Tensor | None = None, ts_cache: Tensor | None = None, ts_new: Tensor | None = None,
    page_table: Tensor | None = None, page_size: int = 0,
) -> Tensor:
    """The op behind the switch: it follows the "hstu_attention" choice (pipeline.kernels), being that op's
    variant for cached keys. The Triton kernel runs when selected and the bias is purely positional. With a
    page_table, k_cache/v_cache are a page pool (and ts_cache the pool's timestamps): see the module's doc."""
    from pipeline.kernels import wants_triton

    paged = page_table is not None and page_size > 0
    if time_weight is None and wants_triton("hstu_attention", q.device):
        table = page_table if paged else c_len.new_empty(0)
        return torch.ops.genrec.hstu_cached_attention(q, k_cache, v_cache, k_new, v_new, c_off, c_len, n_off, n_len,
                                                      q_off, q_len, position_weight, max_len, max_keys, max_queries,
                                                      table, page_size if paged else 0)
    return cached_attention_reference(q, k_cache, v_cache, k_new, v_new, c_off, c_len, n_off, n_len, q_off, q_len,
                                      position_weight, max_len, max_keys, max_queries, time_weight, ts_cache, ts_new,
                                      page_table, page_size)
