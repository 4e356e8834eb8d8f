"""Encoding of the teacher's per-token top-k into compact integer streams, and back.

Why this layout (measured on SmolLM2-135M-Instruct's top-k: docs/shard-format.md, and
BENCHMARKS.md, "Shard format"):

* Ids are stored as a *set*, not in rank order. The order of the top-k costs about as many
  bits as the ids themselves; the losses do not need it (ids and logprobs stay aligned).
* Each file carries a frequency ranking of the vocabulary (`rank order`): ids become ranks,
  each token's ranks are sorted and delta coded, so frequent tokens become small numbers
  and zstd's entropy coder sees a skewed, byte-sized alphabet (far fewer bits per id than
  raw: BENCHMARKS.md, "Shard format").
* Logprobs are quantized with a `Codebook` whose step grows as the probability falls
  (step ~ c / sqrt(p), capped). Each top-k entry then adds about the same KL error, which
  is what minimizes bits at a given mean KL(decoded || float32 top-k).
* The response token is taken out of the set when it is in the top-k (its id is already
  in `response_ids`), and its logprob is stored once, as `token_level`.
* The tail (mass outside the top-k) is stored explicitly in log space at 1/1024 nats, so
  the tail bucket is exact to about 5e-4 relative, whatever the quantization of the top-k.

Shapes: N response tokens, K = k entries per token, M = K - 1 entries in the main block.
"""

from __future__ import annotations

import base64
import functools
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import zstandard

TAIL_STEPS_PER_NAT = 1024
LOWEST_LOGPROB = -64.0  # below e^-64 a probability is treated as e^-64: far under float32 eps


@dataclass(frozen=True)
class Codebook:
    """Non-uniform logprob quantizer: levels descend from 0 with a step that grows as p falls.

    The step at logprob l is min(step_max, step_top * exp(-l / 2)), i.e. proportional to
    1/sqrt(p): uniform in KL contribution per entry. `step_max` keeps a bounded log error for
    improbable tokens, which matters for reverse KL (weighted by the student's mass).
    """

    step_top: float
    step_max: float

    @classmethod
    def for_k(cls, k: int) -> Codebook:
        # The KL of the whole top-k grows with k * step_top^2; scaling step_top by 1/sqrt(k)
        # keeps the mean KL near 5e-5 nats per token at every k.
        return cls(step_top=round(1.0 / (20.0 * math.sqrt(k)), 8), step_max=1.0)

    @functools.cached_property
    def levels(self) -> np.ndarray:
        """Reconstruction points, descending from 0. Shape: (L,), float64."""
        out = [0.0]
        while out[-1] > LOWEST_LOGPROB:
            out.append(out[-1] - min(self.step_max, self.step_top * math.exp(-out[-1] / 2)))
        if len(out) > 65535:
            raise ValueError(f"codebook with step_top={self.step_top} needs {len(out)} levels")
        return np.asarray(out, dtype=np.float64)

    @functools.cached_property
    def table(self) -> np.ndarray:
        """Levels as float32, the decode lookup table. Shape: (L,)."""
        return self.levels.astype(np.float32)

    @functools.cached_property
    def _boundaries(self) -> np.ndarray:
        # Midpoints between consecutive levels, as ascending negated logprobs.
        neg = -self.levels
        return (neg[:-1] + neg[1:]) / 2

    @functools.cached_property
    def _grid(self) -> tuple[float, np.ndarray, np.ndarray]:
        # A uniform grid over the negated logprobs, fine enough that no cell holds two
        # boundaries: per cell, the boundaries below it and the one inside it (+inf if none).
        # Cells and values are found with the same float operation (floor(x * scale)), which
        # is monotone, so a boundary in a lower cell is below the value, one in a higher cell
        # above it, and one in the value's cell is compared: searchsorted's answer, exactly.
        bnd = self._boundaries
        gaps = np.diff(bnd)
        scale = 2.0 / float(gaps.min()) if len(gaps) else 1.0
        cell = np.floor(bnd * scale).astype(np.int64)
        n_cells = int(cell[-1]) + 2 if len(bnd) else 1
        below = np.zeros(n_cells, np.int64)
        np.add.at(below, np.minimum(cell + 1, n_cells - 1), 1)
        below = np.cumsum(below)
        inside = np.full(n_cells, np.inf)
        inside[cell] = bnd
        if len(np.unique(cell)) != len(cell):  # cannot happen: cells are half the smallest gap
            raise AssertionError("codebook grid cell with two boundaries")
        return scale, below, inside

    def quantize(self, logprobs: np.ndarray) -> np.ndarray:
        """Nearest level index of each logprob (any shape), as uint16.

        Equal to np.searchsorted(boundaries, -logprob), found in a grid (`_grid`): two
        lookups per value instead of a binary search over about a thousand boundaries.
        """
        neg = -np.nan_to_num(np.asarray(logprobs, dtype=np.float64), neginf=LOWEST_LOGPROB)
        scale, below, inside = self._grid
        cell = np.floor(neg * scale)
        np.clip(cell, 0, len(below) - 1, out=cell)
        cell = cell.astype(np.intp)
        idx = below[cell]
        idx += neg > inside[cell]
        return idx.astype(np.uint16)

    def to_json(self) -> dict:
        return {"step_top": self.step_top, "step_max": self.step_max}

    @classmethod
    def from_json(cls, d: dict) -> Codebook:
        return cls(step_top=float(d["step_top"]), step_max=float(d["step_max"]))


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher signal for N response tokens.

    ids: (N, K) int32, the teacher's top-k token ids, in no particular order.
    logprobs: (N, K) float32, raw logprobs (temperature 1) aligned with `ids`.
    tail_logprob: (N,) float32, log of the probability mass outside the top-k.
    token_logprob: (N,) float32, the teacher's logprob of the actual response token.
    """

    ids: np.ndarray
    logprobs: np.ndarray
    tail_logprob: np.ndarray
    token_logprob: np.ndarray


# ---- per-file frequency ranking of the vocabulary ------------------------------------------


def build_rank_order(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Token ids sorted by how often they occur in `ids` (ties and unseen ids by id).

    Shape: (vocab_size,), uint32; order[r] is the id with rank r.
    """
    counts = np.bincount(np.asarray(ids, dtype=np.int64).ravel(), minlength=vocab_size)
    return np.argsort(-counts, kind="stable").astype(np.uint32)


def invert_order(order: np.ndarray) -> np.ndarray:
    """rank_of[id] for a rank order. Shape: (V,), int64."""
    rank_of = np.empty(len(order), dtype=np.int64)
    rank_of[order] = np.arange(len(order))
    return rank_of


def pack_order(order: np.ndarray, ids: np.ndarray) -> bytes:
    """Serialize a rank order built from `ids`: only the ids seen there are stored.

    The unseen ids follow in ascending order, which `unpack_order` restores, so a file pays
    for the few thousand ids its top-k actually uses, not the whole vocabulary.
    """
    seen = int((np.bincount(np.asarray(ids, dtype=np.int64).ravel(), minlength=1) > 0).sum())
    head = order[:seen].astype("<u4").tobytes()
    return base64.b64encode(zstandard.ZstdCompressor(level=19).compress(head))


def unpack_order(blob: bytes, vocab_size: int) -> np.ndarray:
    """Inverse of `pack_order`. Shape: (vocab_size,), int32."""
    head = np.frombuffer(
        zstandard.ZstdDecompressor().decompress(base64.b64decode(blob)), dtype="<u4"
    ).astype(np.int32)
    if len(head) > vocab_size or (len(head) and head.max() >= vocab_size):
        raise ValueError(f"rank order does not fit vocab_size {vocab_size}")
    rest = np.ones(vocab_size, dtype=bool)
    rest[head] = False
    if rest.sum() != vocab_size - len(head):
        raise ValueError("rank order repeats an id")
    return np.concatenate([head, np.flatnonzero(rest).astype(np.int32)])


# ---- encode / decode --------------------------------------------------------------------------


def tail_logprob_of(topk_logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum(exp(topk))) per token, in float64 so a near-zero tail is not lost.

    Shape: (N, K) -> (N,).
    """
    lp = np.asarray(topk_logprobs, dtype=np.float64)
    top = lp.max(axis=1, keepdims=True)
    lse = (
        (top[:, 0] + np.log(np.exp(lp - top).sum(axis=1)))
        if lp.shape[1]
        else np.full(len(lp), -np.inf)
    )
    tail = -np.expm1(np.minimum(lse, 0.0))
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(tail), LOWEST_LOGPROB)


def encode_tokens(
    topk_ids: np.ndarray,
    topk_logprobs: np.ndarray,
    response_ids: np.ndarray,
    token_logprobs: np.ndarray | None,
    rank_of: np.ndarray,
    codebook: Codebook,
) -> dict[str, np.ndarray]:
    """Encode N tokens' top-k into the flat integer streams stored in a shard row.

    topk_ids, topk_logprobs: (N, K); response_ids: (N,); token_logprobs: (N,) or None (then
    every response token must be in its top-k). Raises ValueError naming the first bad token.
    """
    ids = np.asarray(topk_ids, dtype=np.int64)
    lps = np.asarray(topk_logprobs, dtype=np.float32)
    resp = np.asarray(response_ids, dtype=np.int64)
    n, k = ids.shape
    vocab = len(rank_of)
    if lps.shape != (n, k) or resp.shape != (n,):
        raise ValueError(
            f"shape mismatch: ids {ids.shape}, logprobs {lps.shape}, response {resp.shape}"
        )
    if n and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(np.argmax((ids < 0).any(1) | (ids >= vocab).any(1)))
        raise ValueError(f"token {bad}: top-k id outside the vocabulary [0, {vocab})")
    if np.isnan(lps).any() or (lps > 1e-3).any():
        bad = int(np.argmax(np.isnan(lps).any(1) | (lps > 1e-3).any(1)))
        raise ValueError(f"token {bad}: top-k logprob is NaN or positive")
    hit = ids == resp[:, None]
    in_topk = hit.any(axis=1)
    if token_logprobs is None:
        if not in_topk.all():
            raise ValueError(
                f"token {int(np.argmin(in_topk))}: response token not in the top-k and no "
                "token logprob given"
            )
        token_lp = lps[hit]
    else:
        token_lp = np.asarray(token_logprobs, dtype=np.float32)
    levels = codebook.quantize(lps)
    # The response token gets the largest rank so that sorting moves it to the last column,
    # which is then dropped: its id is response_ids, its logprob token_level.
    ranks = np.asarray(rank_of[ids], dtype=np.int64)
    ranks[hit] = vocab
    # A stable argsort by rank, as one plain sort of (rank, column) packed in an integer:
    # unique keys, so any sort gives the stable order, and numpy's is much faster on values.
    shift = max(1, (k - 1).bit_length())
    key = ranks << shift
    key |= np.arange(k, dtype=np.int64)
    key.sort(axis=1)
    order = key & ((1 << shift) - 1)
    ranks = key >> shift
    levels = np.take_along_axis(levels, order, axis=1)
    if k > 1 and (ranks[:, 1:] == ranks[:, :-1]).any():
        bad = int(np.argmax((ranks[:, 1:] == ranks[:, :-1]).any(1)))
        raise ValueError(f"token {bad}: duplicate ids in the top-k")
    m = k - 1
    main = ranks[:, :m]
    delta = np.diff(main, axis=1, prepend=0) if m else main
    out = {
        "topk_rank_delta_lo": (delta & 0xFF).astype(np.uint8).ravel(),
        "topk_rank_delta_hi": (delta >> 8).astype(np.uint16).ravel(),
        "topk_level_lo": (levels[:, :m] & 0xFF).astype(np.uint8).ravel(),
        "topk_level_hi": (levels[:, :m] >> 8).astype(np.uint8).ravel(),
        "token_in_topk": in_topk,
        "token_level": codebook.quantize(token_lp),
        "tail_level": np.clip(np.rint(-tail_logprob_of(lps) * TAIL_STEPS_PER_NAT), 0, 65535).astype(
            np.uint16
        ),
    }
    missing = ~in_topk
    prev = main[missing, m - 1] if m else np.zeros(int(missing.sum()), dtype=np.int64)
    out["extra_rank_delta"] = (ranks[missing, m] - prev).astype(np.uint32)
    out["extra_level"] = levels[missing, m].astype(np.uint16)
    return out


def _empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized array in Arrow's memory pool.

    Decoding allocates a few MB per block and frees them right away; from malloc, each such
    array is a fresh mmap whose pages fault in one by one (a large part of the read time:
    BENCHMARKS.md, "Shard format", malloc tuned), while Arrow's pool (mimalloc/jemalloc)
    keeps freed pages mapped and reuses them.
    """
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    buf = pa.allocate_buffer(max(n * dtype.itemsize, 1))
    return np.frombuffer(buf, dtype=dtype, count=n).reshape(shape)


def decode_tokens(
    cols: dict[str, np.ndarray],
    response_ids: np.ndarray,
    k: int,
    order: np.ndarray,
    codebook: Codebook,
) -> TeacherTopK:
    """Inverse of `encode_tokens` for any number of tokens (one row or a whole batch).

    `cols` holds the flat streams of N tokens in the order they were encoded; response_ids
    has shape (N,). Vectorized: no Python loop over tokens or rows. Raises ValueError when a
    rank or level points outside the rank order or codebook (corrupt streams).
    """
    resp = np.asarray(response_ids)
    order = np.asarray(order, dtype=np.int32)  # no copy for the reader's int32 order
    n, m = len(resp), k - 1
    table = codebook.table
    ids = _empty((n, k), np.int32)
    logprobs = _empty((n, k), np.float32)
    ranks = None
    if m and n:
        delta = _empty((n * m,), np.int32)
        np.copyto(delta, cols["topk_rank_delta_hi"], casting="unsafe")
        delta <<= 8
        delta |= cols["topk_rank_delta_lo"]
        ranks = _empty((n, m), np.int32)
        np.cumsum(delta.reshape(n, m), axis=1, out=ranks)
        # Ranks rise along a row, so the last column holds each row's largest.
        if ranks[:, -1].max() >= len(order) or ranks[:, 0].min() < 0:
            raise ValueError("top-k rank outside the rank order")
        np.take(order, ranks, out=ids[:, :m], mode="clip")  # clip: unbuffered, checked above
        level = _empty((n * m,), np.uint16)
        np.copyto(level, cols["topk_level_hi"], casting="unsafe")
        level <<= 8
        level |= cols["topk_level_lo"]
        if level.max() >= len(table):
            raise ValueError("top-k level outside the codebook")
        np.take(table, level.reshape(n, m), out=logprobs[:, :m], mode="clip")
    in_topk = np.asarray(cols["token_in_topk"], dtype=bool)
    token_logprob = table[cols["token_level"]]
    ids[:, m] = np.where(in_topk, resp, 0)
    logprobs[:, m] = token_logprob
    missing = ~in_topk
    if missing.any():
        prev = ranks[missing, m - 1] if ranks is not None else 0
        ids[missing, m] = order[prev + cols["extra_rank_delta"].astype(np.int64)]
        logprobs[missing, m] = table[cols["extra_level"]]
    tail = cols["tail_level"].astype(np.float32) * np.float32(-1.0 / TAIL_STEPS_PER_NAT)
    return TeacherTopK(ids=ids, logprobs=logprobs, tail_logprob=tail, token_logprob=token_logprob)
