"""Merging a writer's small committed files into one: the streams of shards.codec re-ranked
to one rank order, exactly (integers only, nothing re-quantized).

Frequent commits (precompute's `commit_every`) make small files, each with its own rank
table in its schema and its own zstd contexts; one file per writer costs fewer bytes per
token. The rows, their order within each file and every decoded value stay the same.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from shards import codec
from shards.schema import PER_ENTRY, PER_EXTRA
from shards.spans import batch_trained_index


def _flat(batch: pa.RecordBatch, name: str) -> np.ndarray:
    col = batch.column(name)
    off = col.offsets.to_numpy()
    return col.values.to_numpy(zero_copy_only=False)[off[0] : off[-1]]


def topk_ids(batch: pa.RecordBatch, k: int, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N, k) int64, in_topk (N,)) of a record batch's N trained tokens: column k-1
    holds the K-th entry of tokens whose own id is outside the top-k, else that id."""
    resp = _flat(batch, "response_ids").astype(np.int64)[batch_trained_index(batch)[1]]
    n, m = len(resp), k - 1
    lo, hi = _flat(batch, "topk_rank_delta_lo"), _flat(batch, "topk_rank_delta_hi")
    ranks = np.cumsum(((hi.astype(np.int64) << 8) | lo).reshape(n, m), axis=1)
    in_topk = _flat(batch, "token_in_topk").astype(bool)
    ids = np.empty((n, k), np.int64)
    ids[:, :m] = order[ranks]
    ids[:, m] = resp
    missing = ~in_topk
    if missing.any():
        prev = ranks[missing, m - 1] if m else 0
        ids[missing, m] = order[prev + _flat(batch, "extra_rank_delta").astype(np.int64)]
    return ids, in_topk


def rerank(batch: pa.RecordBatch, k: int, order: np.ndarray, rank_of: np.ndarray) -> dict:
    """The batch's PER_ENTRY and PER_EXTRA streams (flat arrays) under another rank order
    (`rank_of`: new rank of each id); levels move with their ids."""
    ids, in_topk = topk_ids(batch, k, order)
    n, m = len(ids), k - 1
    lev_lo, lev_hi = _flat(batch, "topk_level_lo"), _flat(batch, "topk_level_hi")
    levels = np.empty((n, k), np.int64)
    levels[:, :m] = ((lev_hi.astype(np.int64) << 8) | lev_lo).reshape(n, m)
    levels[:, m] = 0
    missing = ~in_topk
    levels[missing, m] = _flat(batch, "extra_level")
    # As the encoder does: the trained token (in its top-k) sorts last and is dropped.
    ranks = rank_of[ids]
    ranks[in_topk, m] = len(rank_of)
    srt = np.argsort(ranks, axis=1, kind="stable")
    ranks = np.take_along_axis(ranks, srt, axis=1)
    levels = np.take_along_axis(levels, srt, axis=1)
    main = ranks[:, :m]
    delta = np.diff(main, axis=1, prepend=0) if m else main
    prev = main[missing, m - 1] if m else np.zeros(int(missing.sum()), np.int64)
    out = {
        "topk_rank_delta_lo": (delta & 0xFF).astype(np.uint8).ravel(),
        "topk_rank_delta_hi": (delta >> 8).astype(np.uint16).ravel(),
        "topk_level_lo": (levels[:, :m] & 0xFF).astype(np.uint8).ravel(),
        "topk_level_hi": (levels[:, :m] >> 8).astype(np.uint8).ravel(),
        "extra_rank_delta": (ranks[missing, m] - prev).astype(np.uint32),
        "extra_level": levels[missing, m].astype(np.uint16),
    }
    assert set(out) == set(PER_ENTRY + PER_EXTRA)
    return out


def rebuild(batch: pa.RecordBatch, k: int, order: np.ndarray, rank_of: np.ndarray):
    """The batch with its top-k streams re-ranked (same schema, same rows)."""
    new = rerank(batch, k, order, rank_of)
    tok_off = batch_trained_index(batch)[0]
    in_topk = _flat(batch, "token_in_topk").astype(bool)
    missing = np.concatenate([[0], np.cumsum(~in_topk)])[tok_off]
    arrays = []
    for name in batch.schema.names:
        if name in PER_ENTRY:
            off = tok_off * (k - 1)
        elif name in PER_EXTRA:
            off = missing
        else:
            arrays.append(batch.column(name))
            continue
        arrays.append(pa.ListArray.from_arrays(pa.array(off.astype(np.int32)), pa.array(new[name])))
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


def merged_order(batches_orders, k: int, vocab_size: int, tokens: int) -> tuple[np.ndarray, bytes]:
    """A rank order from the top-k ids of the first `tokens` trained tokens (most frequent
    first; as ShardWriter ranks by a file's first record batch: a longer sample stores more
    seen ids in the schema and measured no smaller), and its packed form for the schema."""
    ids, n = [], 0
    for b, order in batches_orders:
        if n >= tokens:
            break
        ids.append(topk_ids(b, k, order)[0].ravel())
        n += len(ids[-1]) // k
    ids = np.concatenate(ids)
    order = codec.build_rank_order(ids, vocab_size)
    return order, codec.pack_order(order, ids)
