"""Decoded views of a shard folder, for tools that know Arrow but not kdshards' codec.

    import shards.hf
    ds = shards.hf.load("out/shards")                   # datasets.Dataset, in memory
    ds = shards.hf.load("out/shards", streaming=True)   # datasets.IterableDataset

Each row is one conversation with its teacher signal decoded (P prompt and T response
tokens, N trained tokens, K = k):

    id, sample_index, source, thinking, meta (JSON text)   the row's metadata
    prompt_ids, teacher_prompt_ids, response_ids           list<int32>: Q, Q+E, response (T)
    span_starts, span_lengths                               list<int32>: trained spans (S)
    turn_starts, turn_roles                                 list<int32 | string>: messages (M)
    topk_ids, topk_logprobs                                 list<list<int32 | float32>>: (N, K)
    tail_logprob, token_logprob                             list<float32>: (N,)

Spans and turns are in conversation coordinates (offsets into prompt_ids + response_ids);
the N trained tokens are the span tokens in span order (`shards.spans`). topk_ids[n] is the
teacher's top-k at trained token n as a set (the codec does not keep rank order; ids and
logprobs stay aligned), tail_logprob[n] = log(1 - sum(exp(top-k))) and token_logprob[n] the
teacher's logprob of that token. A v1 folder gives one span per row and no turns.
Decoding goes through `ShardFolder.read_block` (shards/reader.py), so checksums and stream
lengths are checked as for training. `decoded_batches` is the same as Arrow record batches, which
`python -m tools.shards export` writes to Parquet.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from shards.reader import Block, ShardFolder

ROW_COLUMNS = ("id", "sample_index", "source", "thinking", "meta")
TOKEN_COLUMNS = ("prompt_ids", "teacher_prompt_ids", "response_ids")
DECODED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("thinking", pa.bool_()),
        pa.field("meta", pa.string()),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("teacher_prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("span_starts", pa.list_(pa.int32()), nullable=False),
        pa.field("span_lengths", pa.list_(pa.int32()), nullable=False),
        pa.field("turn_starts", pa.list_(pa.int32()), nullable=False),
        pa.field("turn_roles", pa.list_(pa.string()), nullable=False),
        pa.field("topk_ids", pa.list_(pa.list_(pa.int32())), nullable=False),
        pa.field("topk_logprobs", pa.list_(pa.list_(pa.float32())), nullable=False),
        pa.field("tail_logprob", pa.list_(pa.float32()), nullable=False),
        pa.field("token_logprob", pa.list_(pa.float32()), nullable=False),
    ]
)


def _lists(offsets: np.ndarray, values: pa.Array | np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(np.asarray(offsets, np.int32)), values)


def decoded_batch(block: Block) -> pa.RecordBatch:
    """One decoded block as a record batch of DECODED_SCHEMA."""
    tensors = {name: t.numpy() for name, t in block.tensors.items()}
    tok_off = block.offsets["trained"]
    k = tensors["topk_ids"].shape[1]
    # (N*K,) values -> (N,) lists of K -> (rows,) lists of each row's trained tokens.
    per_token = np.arange(len(tensors["topk_ids"]) + 1, dtype=np.int64) * k
    columns = {n: pa.array(block.rows[n], DECODED_SCHEMA.field(n).type) for n in ROW_COLUMNS}
    for name in ("prompt_ids", "teacher_prompt_ids"):
        columns[name] = _lists(block.offsets[name], tensors[name])
    columns["response_ids"] = _lists(block.offsets["response"], tensors["response_ids"])
    for name in ("span_starts", "span_lengths"):
        columns[name] = _lists(block.offsets["spans"], tensors[name].astype(np.int32))
    columns["turn_starts"] = _lists(block.offsets["turns"], tensors["turn_starts"].astype(np.int32))
    roles = pa.array([r for rs in block.rows["turn_roles"] for r in rs], pa.string())
    columns["turn_roles"] = _lists(block.offsets["turns"], roles)
    for name in ("topk_ids", "topk_logprobs"):
        inner = _lists(per_token, tensors[name].reshape(-1))
        columns[name] = _lists(tok_off, inner)
    for name in ("tail_logprob", "token_logprob"):
        columns[name] = _lists(tok_off, tensors[name].astype(np.float32))
    return pa.RecordBatch.from_pydict(columns, schema=DECODED_SCHEMA)


def decoded_batches(
    folder: str | Path, *, verify: str = "full", files: Iterable[int] | None = None
) -> Iterator[pa.RecordBatch]:
    """The folder's rows decoded, one record batch per stored block, in file order.

    files: indices into the manifest's file list (default all): how `load(streaming=True)`
    spreads a folder over DataLoader workers.
    """
    sf = ShardFolder(folder, verify=verify)
    wanted = None if files is None else set(files)
    for fi, bi, _ in sf.blocks:
        if wanted is None or int(fi) in wanted:
            yield decoded_batch(sf.read_block(int(fi), int(bi)))


def _rows(folder: str, verify: str, files: list[int]) -> Iterator[dict]:
    for batch in decoded_batches(folder, verify=verify, files=files):
        yield from batch.to_pylist()


def load(folder: str | Path, streaming: bool = False, *, verify: str = "full"):
    """The folder as a `datasets.Dataset` (decoded in memory), or with streaming=True as a
    `datasets.IterableDataset` that decodes block by block (for folders larger than memory;
    its shards are the folder's files, so DataLoader workers split them)."""
    import datasets  # seconds to import; readers and writers of shards do without it

    if not streaming:
        table = pa.Table.from_batches(list(decoded_batches(folder, verify=verify)), DECODED_SCHEMA)
        return datasets.Dataset(table)
    n_files = len(ShardFolder(folder, verify="none").manifest.files)
    return datasets.IterableDataset.from_generator(
        _rows,
        features=datasets.Features.from_arrow_schema(DECODED_SCHEMA),
        gen_kwargs={"folder": str(folder), "verify": verify, "files": list(range(n_files))},
    )
