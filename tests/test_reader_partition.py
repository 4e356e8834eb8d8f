"""ShardReader: partitioning across ranks and DataLoader workers, shuffling, resume, memory."""

from __future__ import annotations

import tracemalloc
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pytest
from torch.utils.data import DataLoader

from shards.manifest import load_manifest
from shards.reader import Block, ShardReader
from shards.writer import ShardRow, ShardWriter
from tests.shards_helpers import make_examples, metadata, row_key, write_examples

# Up to 3 DataLoader workers on machines with fewer cores: torch warns, the test is still valid.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

EPOCHS = 2
WINDOW = 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """~70 rows in ~30 record batches of 1..5 rows, over several files."""
    path = tmp_path_factory.mktemp("part")
    write_examples(path, part_examples(), batch_tokens=10, target_file_bytes=5_000)
    return path


def part_examples():
    return make_examples(31, 45, max_samples=2, max_len=6)


@pytest.fixture(scope="module")
def all_keys(folder):
    keys = [row_key(r) for r in ShardReader(folder, shuffle=False)]
    assert len(keys) == len(set(keys)) == load_manifest(folder).rows
    return keys


def reader_for(folder, **kw) -> ShardReader:
    kw.setdefault("epochs", EPOCHS)
    kw.setdefault("window_blocks", WINDOW)
    return ShardReader(folder, **kw)


def run(reader: ShardReader, workers: int, take: int | None = None, stop=None):
    """Rows of a real DataLoader over `reader`: [(key, cursor)], stopping after `take` rows
    or when stop(rows so far) is true."""
    out = []
    if take == 0 or (stop is not None and stop(out)):
        return out
    for row in DataLoader(reader, batch_size=None, num_workers=workers):
        out.append((row_key(row), tuple(int(c) for c in row["cursor"])))
        if len(out) == take or (stop is not None and stop(out)):
            break
    return out


def by_epoch(rows):
    epochs = defaultdict(list)
    for key, (_, epoch, _) in rows:
        epochs[epoch].append(key)
    return epochs


def by_shard(rows):
    shards = defaultdict(list)
    for key, (shard, epoch, pos) in rows:
        shards[shard].append((key, epoch, pos))
    return shards


def test_folder_has_enough_blocks(folder):
    blocks = [n for f in load_manifest(folder).files for n in f.batch_rows]
    assert len(blocks) >= 20 and len(load_manifest(folder).files) >= 3
    assert len(set(blocks)) > 1  # blocks of different sizes


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_every_row_once_per_epoch(folder, all_keys, world_size, workers):
    rows = []
    for rank in range(world_size):
        reader = reader_for(folder, seed=5, rank=rank, world_size=world_size, num_workers=workers)
        got = run(reader, workers)
        shards = {c[0] for _, c in got}
        assert shards <= set(range(rank * max(1, workers), (rank + 1) * max(1, workers)))
        rows += got
    epochs = by_epoch(rows)
    assert sorted(epochs) == list(range(EPOCHS))
    for keys in epochs.values():
        assert Counter(keys) == Counter(all_keys)  # every row exactly once per epoch
    # Per shard, cursors count up 1, 2, ... within each epoch.
    for items in by_shard(rows).values():
        for e in range(EPOCHS):
            assert [p for _, ep, p in items if ep == e] == list(
                range(1, sum(ep == e for _, ep, _ in items) + 1)
            )
    # Shuffled: epoch 1 is not epoch 0 again (compared per rank, the order a rank sees).
    assert epochs[0] != epochs[1]


def full_order(folder, seed, workers=0, world_size=1):
    rows = []
    for rank in range(world_size):
        reader = reader_for(
            folder, seed=seed, rank=rank, world_size=world_size, num_workers=workers
        )
        rows.append(run(reader, workers))
    return rows


@pytest.mark.parametrize("workers, world_size", [(0, 1), (2, 2)])
def test_order_is_a_function_of_the_seed(folder, workers, world_size):
    a = full_order(folder, 1, workers, world_size)
    b = full_order(folder, 1, workers, world_size)
    c = full_order(folder, 2, workers, world_size)
    assert a == b
    assert a != c
    for rank_a, rank_c in zip(a, c, strict=True):
        assert by_epoch(rank_a)[0] != by_epoch(rank_c)[0]
        assert by_epoch(rank_a)[1] != by_epoch(rank_c)[1]


def test_no_shuffle_reads_in_file_order(folder, all_keys):
    want = [(r.id, r.sample_index) for rows in part_examples() for r in rows]
    assert all_keys == want


def test_workers_must_match(folder):
    with pytest.raises(ValueError, match="num_workers=2 but runs in a DataLoader with 1"):
        run(reader_for(folder, num_workers=2), workers=0)


def test_more_shards_than_blocks(tmp_path):
    write_examples(tmp_path, make_examples(2, 3, max_samples=1), batch_tokens=10**6)
    assert sum(len(f.batch_rows) for f in load_manifest(tmp_path).files) == 1
    keys = []
    for rank in range(3):
        keys += [k for k, _ in run(reader_for(tmp_path, rank=rank, world_size=3, epochs=1), 0)]
    assert sorted(keys) == sorted(row_key(r) for r in ShardReader(tmp_path))


# ---- resume -------------------------------------------------------------------------------------


def window_plan(folder, seed, shard, num_workers=0, world_size=1, rank=0):
    """Rows per window of `shard` in epoch 0, from the reader's public plan."""
    r = reader_for(folder, seed=seed, num_workers=num_workers, world_size=world_size, rank=rank)
    sizes = r.folder.blocks[r.shard_blocks(0, shard), 2]
    return [int(sizes[i : i + WINDOW].sum()) for i in range(0, len(sizes), WINDOW)]


def cut_points(windows, total, more=True):
    """0, mid-window, a window boundary, the epoch boundary, the end; `more` adds one row,
    the second window boundary, the last row of epoch 0 and a row of epoch 1."""
    epoch = sum(windows)  # rows of epoch 0
    first = windows[0]
    cuts = {0, first // 2, first, epoch, total}
    if more:
        cuts |= {1, first + 1, first + windows[1], epoch - 1, epoch + 3}
    return sorted(cuts)


@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 1)])
def test_resume_in_process(folder, world_size, rank):
    seed = 9
    ref = run(reader_for(folder, seed=seed, world_size=world_size, rank=rank), 0)
    windows = window_plan(folder, seed, rank, world_size=world_size, rank=rank)
    assert len(windows) >= 3 and sum(windows) == sum(c[1] == 0 for _, c in ref)
    for cut in cut_points(windows, len(ref)):
        first = reader_for(folder, seed=seed, world_size=world_size, rank=rank)
        head = run(first, 0, take=cut)
        assert head == ref[:cut]
        state = first.state_dict()
        fresh = reader_for(folder, seed=seed, world_size=world_size, rank=rank)
        fresh.load_state_dict(state)
        rest = run(fresh, 0)
        assert rest == ref[cut:], f"cut {cut}"


def test_resume_iterating_the_reader_directly(folder):
    ref = [(row_key(r), r["cursor"]) for r in reader_for(folder, seed=4)]
    reader = reader_for(folder, seed=4)
    it = iter(reader)
    head = [(row_key(r), r["cursor"]) for _, r in zip(range(17), it, strict=False)]
    fresh = reader_for(folder, seed=4)
    fresh.load_state_dict(reader.state_dict())
    assert head + [(row_key(r), r["cursor"]) for r in fresh] == ref


@pytest.mark.parametrize("world_size, rank, workers", [(1, 0, 2), (2, 1, 3)])
def test_resume_with_workers(folder, world_size, rank, workers):
    """Rows handed to the trainer are the consumed ones; prefetched rows are read again.

    The interleaving of workers restarts after a resume, so remaining rows are compared
    per shard (each shard's sequence is fully determined by the plan)."""
    seed = 13
    kw = dict(seed=seed, world_size=world_size, rank=rank, num_workers=workers)
    ref = by_shard(run(reader_for(folder, **kw), workers))
    shard0 = rank * workers
    windows = window_plan(
        folder, seed, shard0, num_workers=workers, world_size=world_size, rank=rank
    )
    total = sum(len(v) for v in ref.values())
    for cut in cut_points(windows, len(ref[shard0]), more=False):
        first = reader_for(folder, **kw)

        def stop(rows, cut=cut):
            return sum(c[0] == shard0 for _, c in rows) >= cut

        head = run(first, workers, stop=stop)
        first.update(c for _, c in head)
        fresh = reader_for(folder, **kw)
        fresh.load_state_dict(first.state_dict())
        rest = run(fresh, workers)
        assert len(head) + len(rest) == total
        got_head, got_rest = by_shard(head), by_shard(rest)
        for shard, seq in ref.items():
            n = len(got_head[shard])
            assert got_head[shard] == seq[:n]
            assert got_rest[shard] == seq[n:], f"cut {cut}, shard {shard}"
        assert len(got_head[shard0]) == cut


def test_update_ignores_older_cursors(folder):
    r = reader_for(folder)
    r.update([(0, 1, 3), (0, 0, 50), (0, 1, 2)])
    assert r.state_dict()["positions"] == {"0": [1, 3]}


@pytest.mark.parametrize(
    "other",
    [
        dict(seed=1),
        dict(world_size=2, rank=0),
        dict(world_size=2, rank=1),
        dict(num_workers=2),
        dict(window_blocks=3),
        dict(shuffle=False),
    ],
)
def test_mismatched_state_is_refused(folder, other):
    saved = reader_for(folder, seed=0)
    saved.update([(0, 0, 3)])
    reader = reader_for(folder, **{"seed": 0, **other})
    with pytest.raises(ValueError, match="resuming would not continue"):
        reader.load_state_dict(saved.state_dict())


def test_state_from_another_rank_worker_split_is_refused(folder):
    """2 ranks x 3 workers and 3 ranks x 2 workers both have 6 shards, split differently."""
    saved = reader_for(folder, world_size=2, rank=0, num_workers=3)
    saved.update([(2, 0, 1)])
    reader = reader_for(folder, world_size=3, rank=0, num_workers=2)
    with pytest.raises(ValueError, match="resuming would not continue"):
        reader.load_state_dict(saved.state_dict())


def test_state_from_another_folder_is_refused(folder, tmp_path):
    write_examples(tmp_path, make_examples(1, 5))
    saved = reader_for(folder)
    with pytest.raises(ValueError, match="files"):
        reader_for(tmp_path).load_state_dict(saved.state_dict())


def test_state_dict_is_json_serializable(folder):
    import json

    r = reader_for(folder)
    run(r, 0, take=7)
    state = json.loads(json.dumps(r.state_dict()))
    fresh = reader_for(folder)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == r.state_dict()


# ---- streaming: memory stays at a few blocks -----------------------------------------------------

MEM_K, MEM_VOCAB = 32, 1009  # prime vocabulary: strided ids below are distinct


def cheap_rows(seed: int, n_rows: int, tokens: int):
    """Rows with random top-k built without a full-vocabulary softmax (fast to make)."""
    rng = np.random.default_rng(seed)
    for i in range(n_rows):
        start = rng.integers(0, MEM_VOCAB, (tokens, 1))
        stride = rng.integers(1, MEM_VOCAB, (tokens, 1))
        ids = (start + stride * np.arange(MEM_K)) % MEM_VOCAB
        p = rng.dirichlet(np.full(MEM_K + 1, 0.3), size=tokens)[:, :MEM_K]
        lps = np.log(np.maximum(p, 1e-30)).astype(np.float32)
        yield ShardRow(
            id=f"m{i:05d}",
            prompt_ids=rng.integers(0, MEM_VOCAB, 30),
            teacher_prompt_ids=rng.integers(0, MEM_VOCAB, 40),
            response_ids=ids[:, 0],
            topk_ids=ids,
            topk_logprobs=lps,
        )


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    """~80 record batches of ~200 KB decoded each; small files so that hashing one file
    (verify="full" reads it in chunks of up to 4 MiB) stays far below the bound too."""
    path = tmp_path_factory.mktemp("big")
    with ShardWriter(
        path,
        metadata(k=MEM_K, vocab_size=MEM_VOCAB),
        batch_tokens=750,
        target_file_bytes=250_000,
        compression_level=1,
    ) as w:
        for row in cheap_rows(0, 1600, 40):
            w.add(row)
    return path


def peak_memory(folder, window_blocks: int) -> tuple[int, int, int]:
    """(peak arrow pool bytes, peak traced Python/numpy bytes, decoded bytes of all rows).

    numpy reports its buffers to tracemalloc; the decoded top-k arrays are allocated from
    pyarrow's pool, which is sampled whenever a record batch is about to be decoded (its
    decompressed buffers are alive then) and at every row. Together they cover every
    decoded block held.
    """
    # verify="size": hashing reads files with read(4 MiB), a fixed request that tracemalloc
    # counts in full whatever the file size; it is not part of the streaming working set.
    reader = ShardReader(folder, window_blocks=window_blocks, epochs=1, seed=3, verify="size")
    tensors = (
        "response_ids",
        "topk_ids",
        "topk_logprobs",
        "tail_logprob",
        "token_logprob",
        "prompt_ids",
        "teacher_prompt_ids",
    )
    arrow0 = pa.total_allocated_bytes()
    arrow_peak, decoded, rows = 0, 0, 0
    real_decode = Block.decode.__func__

    def decode(cls, batch, *args, **kw):
        nonlocal arrow_peak
        arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - arrow0)
        return real_decode(cls, batch, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Block, "decode", classmethod(decode))
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            for row in reader:
                decoded += sum(row[t].nbytes for t in tensors)
                rows += 1
                arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - arrow0)
                del row
            traced_peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    assert rows == load_manifest(folder).rows
    assert arrow_peak > 0  # the sampling sees the decompressed record batches
    return arrow_peak, traced_peak, decoded


@pytest.mark.parametrize("window_blocks", [1, 2])
def test_reader_streams_with_bounded_memory(big_folder, window_blocks):
    arrow_peak, traced_peak, decoded = peak_memory(big_folder, window_blocks)
    blocks = sum(len(f.batch_rows) for f in load_manifest(big_folder).files)
    assert blocks >= 60
    assert decoded > 12e6
    # A window of 1-2 blocks, plus the block of the row the consumer still holds, plus
    # decode temporaries: a few blocks (~200 KB each), far under a fifth of the folder.
    assert arrow_peak + traced_peak < decoded / 5, (arrow_peak, traced_peak, decoded)


def test_memory_check_detects_a_reader_that_loads_everything(big_folder):
    """With one window spanning every block, the same measurement sees the whole folder."""
    arrow_peak, traced_peak, decoded = peak_memory(big_folder, 10**6)
    assert arrow_peak + traced_peak > decoded / 5
    # Decoded top-k arrays live in Arrow's pool (shards.codec._empty), the rest in numpy's.
    assert arrow_peak + traced_peak > 0.8 * decoded
