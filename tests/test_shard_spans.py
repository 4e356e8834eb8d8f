"""Shard format v2: conversation rows with trained spans and turns.

Synthetic rows only: a conversation of alternating context (user/tool turns, template
markers) and trained assistant spans, the top-k given at span tokens only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from shards.errors import ShardError
from shards.manifest import load_manifest
from shards.reader import ShardFolder, read_rows
from shards.schema import ShardMetadata
from shards.spans import trained_ids, trained_mask
from shards.writer import ShardRow, ShardWriter
from tests.shards_helpers import (
    VOCAB,
    assert_row_matches,
    make_examples,
    metadata,
    quantization_bound,
    random_distributions,
    row_key,
    topk_of,
    write_examples,
)

LEGACY = Path(__file__).parent / "fixtures" / "legacy_v1"


def conversation_row(
    rng: np.random.Generator,
    example_id: str,
    *,
    k: int = 16,
    vocab: int = VOCAB,
    p_in_topk: float = 0.7,
    **kw,
) -> ShardRow:
    """A conversation: a prompt (system, user), then 1..4 assistant spans with context turns
    (user or tool) between them. Returns the row with spans and turns."""
    p = int(rng.integers(2, 12))
    prompt = rng.integers(0, vocab, p)
    turns = [(0, "system"), (int(rng.integers(1, p)), "user")]
    n_spans = int(rng.integers(1, 5))
    pieces, spans, pos = [], [], p
    for j in range(n_spans):
        if j:
            ctx = int(rng.integers(1, 7))
            turns.append((pos, ("user", "tool")[int(rng.integers(2))]))
            pieces.append(rng.integers(0, vocab, ctx))
            pos += ctx
        n = int(rng.integers(1, 9))
        spans.append((pos, n))
        turns.append((pos, "assistant"))
        pieces.append(None)  # filled with the sampled span tokens below
        pos += n
    total_n = sum(n for _, n in spans)
    ids, lps, span_tokens, tok, _ = topk_of(
        rng, random_distributions(rng, total_n, vocab), k, p_in_topk
    )
    it = iter(np.split(span_tokens, np.cumsum([n for _, n in spans])[:-1]))
    resp = np.concatenate([next(it) if x is None else x for x in pieces])
    return ShardRow(
        id=example_id,
        prompt_ids=prompt.tolist(),
        teacher_prompt_ids=rng.integers(0, vocab, p + 5).tolist(),
        response_ids=resp,
        topk_ids=ids,
        topk_logprobs=lps,
        token_logprobs=tok,
        spans=spans,
        turns=turns,
        meta={"n_spans": n_spans},
        **kw,
    )


def conversations(seed: int, n: int, **kw) -> list[list[ShardRow]]:
    rng = np.random.default_rng(seed)
    return [[conversation_row(rng, f"conv{i:04d}", **kw)] for i in range(n)]


def span_tokens(row: ShardRow) -> np.ndarray:
    """The trained tokens of a written row, gathered naively."""
    conv = np.concatenate([np.asarray(row.prompt_ids), np.asarray(row.response_ids)])
    return np.concatenate([conv[s : s + n] for s, n in row.spans])


def assert_conversation_matches(got: dict, row: ShardRow, codebook=None) -> None:
    """Exact ids, spans and turns; the top-k as assert_row_matches checks it. `got` is a
    reader row (tensors) or a decoded `shards.hf` row (lists)."""
    reader_row = isinstance(got["span_starts"], torch.Tensor)
    if reader_row:
        assert got["span_starts"].dtype == got["turn_starts"].dtype == torch.int64
    got = {
        n: torch.as_tensor(v) if n.endswith(("_ids", "_starts", "_lengths")) else v
        for n, v in got.items()
    }
    np.testing.assert_array_equal(got["span_starts"].numpy(), [s for s, _ in row.spans])
    np.testing.assert_array_equal(got["span_lengths"].numpy(), [n for _, n in row.spans])
    np.testing.assert_array_equal(got["turn_starts"].numpy(), [s for s, _ in row.turns])
    assert got["turn_roles"] == [r for _, r in row.turns]
    np.testing.assert_array_equal(got["response_ids"].numpy(), np.asarray(row.response_ids))
    np.testing.assert_array_equal(trained_ids(got).numpy(), span_tokens(row))
    # assert_row_matches takes the token's logprob from the top-k where none is given: give
    # it the span tokens as the response it compares against.
    flat = ShardRow(**{**row.__dict__, "response_ids": span_tokens(row)})
    got = {**got, "response_ids": trained_ids(got)}
    assert_row_matches(got, flat, codebook or metadata().codebook)


def test_multi_span_rows_round_trip(tmp_path):
    examples = conversations(1, 40)
    write_examples(tmp_path, examples, batch_tokens=60, target_file_bytes=6_000)
    want = {row_key({"id": r.id, "sample_index": r.sample_index}): r for (r,) in examples}
    rows = list(read_rows(tmp_path))
    assert sorted(row_key(r) for r in rows) == sorted(want)
    assert any(len(r["span_starts"]) > 1 for r in rows)
    for r in rows:
        assert_conversation_matches(r, want[row_key(r)])
    manifest = load_manifest(tmp_path)
    assert len(manifest.files) > 1
    # Manifest tokens are trained tokens.
    assert manifest.tokens == sum(sum(n for _, n in r.spans) for (r,) in examples)


def test_rows_without_spans_are_one_span(tmp_path):
    """precompute and train build ShardRow without spans: one span, the whole response
    (none for an empty response), no turns."""
    examples = make_examples(3, 6)
    examples[0][0].response_ids = np.zeros(0, np.int64)
    examples[0][0].topk_ids = np.zeros((0, 16), np.int64)
    examples[0][0].topk_logprobs = np.zeros((0, 16), np.float32)
    examples[0][0].token_logprobs = np.zeros(0, np.float32)
    write_examples(tmp_path, examples)
    want = {(r.id, r.sample_index): r for rows in examples for r in rows}
    for got in read_rows(tmp_path):
        row = want[row_key(got)]
        p, t = len(row.prompt_ids), len(row.response_ids)
        assert got["span_starts"].tolist() == ([p] if t else [])
        assert got["span_lengths"].tolist() == ([t] if t else [])
        assert got["turn_starts"].tolist() == [] and got["turn_roles"] == []
        assert_row_matches(got, row, metadata().codebook)


def test_v1_folder_reads_as_one_span():
    """tests/fixtures/legacy_v1: files of schema v1 (no span columns)."""
    sf = ShardFolder(LEGACY)
    assert sf.metadata.schema_version == 1
    rows = list(read_rows(LEGACY))
    assert rows
    for r in rows:
        p, t = len(r["prompt_ids"]), len(r["response_ids"])
        assert r["span_starts"].tolist() == [p] and r["span_lengths"].tolist() == [t]
        assert r["turn_starts"].tolist() == [] and r["turn_roles"] == []
        assert r["topk_ids"].shape[0] == t
        torch.testing.assert_close(trained_ids(r), r["response_ids"].long())
        assert trained_mask(r).tolist() == [False] * p + [True] * t


def test_writer_refuses_v1_metadata(tmp_path):
    with pytest.raises(ValueError, match="writers write schema v2 only"):
        ShardWriter(tmp_path, metadata(schema_version=1))


def _bad(row: ShardRow, **change) -> ShardRow:
    return ShardRow(**{**row.__dict__, **change})


@pytest.mark.parametrize(
    "field, change, message",
    [
        ("spans", lambda r, p, e: {"spans": []}, "no span"),
        ("spans", lambda r, p, e: {"spans": [(p + 1, e - p - 1)]}, "span 0 starts at .*, not at"),
        ("spans", lambda r, p, e: {"spans": [(p, e - p - 1)]}, "not at the conversation's end"),
        ("spans", lambda r, p, e: {"spans": [(p, 2), (p + 1, e - p - 1)]}, "before span 0 ends"),
        ("spans", lambda r, p, e: {"spans": [(p, 0), (p, e - p)]}, "span 0: length 0 < 1"),
        ("spans", lambda r, p, e: {"spans": [(p, e - p + 1)]}, "not at the conversation's end"),
        ("spans", lambda r, p, e: {"spans": [(p, 1.5)]}, "integer pairs"),
        ("turns", lambda r, p, e: {"turns": [(0, "user"), (e, "assistant")]}, "turn 1: start"),
        ("turns", lambda r, p, e: {"turns": [(3, "user"), (1, "assistant")]}, "before turn 0"),
        ("turns", lambda r, p, e: {"turns": [(0, "")]}, "turn 0: role must be a non-empty"),
        ("turns", lambda r, p, e: {"turns": [(0, None)]}, "turn 0: role must be a non-empty"),
        ("turns", lambda r, p, e: {"turns": [0]}, r"turn 0: expected a \(start, role\)"),
        ("topk_ids", lambda r, p, e: {"topk_ids": r.topk_ids[:-1]}, r"expected \(\d+, 16\)"),
        (
            "topk_logprobs",
            lambda r, p, e: {"topk_logprobs": np.zeros((e - p, 16), np.float32)},
            "trained tokens",
        ),
    ],
)
def test_bad_spans_and_turns_rejected(tmp_path, field, change, message):
    rng = np.random.default_rng(5)
    row = conversation_row(rng, "conv-bad")
    while len(row.spans) < 2:  # context between spans: e - p != N
        row = conversation_row(rng, "conv-bad")
    p, e = len(row.prompt_ids), len(row.prompt_ids) + len(row.response_ids)
    with ShardWriter(tmp_path, metadata(), compression_level=1) as w:
        with pytest.raises(ShardError, match=message) as err:
            w.add([row, _bad(row, sample_index=1, **change(row, p, e))])
        assert err.value.field == field
        assert "example 'conv-bad'" in str(err.value)
        w.add(row)  # nothing of the refused example was kept
    assert [r["sample_index"] for r in read_rows(tmp_path)] == [0]


def test_token_logprobs_taken_from_topk_at_span_tokens(tmp_path):
    """token_logprobs=None: every SPAN token must be in its top-k; context tokens need not."""
    rng = np.random.default_rng(8)
    rows = [conversation_row(rng, f"c{i}", p_in_topk=1.0) for i in range(6)]
    rows = [_bad(r, token_logprobs=None) for r in rows]
    write_examples(tmp_path, [[r] for r in rows])
    want = {r.id: r for r in rows}
    for got in read_rows(tmp_path):
        assert_conversation_matches(got, want[got["id"]])
    bad = rows[0]
    trained = span_tokens(bad)
    ids = bad.topk_ids.copy()
    ids[2] = [x for x in range(VOCAB) if x != trained[2]][:16]  # span token 2 leaves the top-k
    with ShardWriter(tmp_path / "b", metadata(), compression_level=1) as w:
        with pytest.raises(ShardError, match="token 2 is not in its top-k") as err:
            w.add(_bad(bad, topk_ids=ids))
    assert err.value.field == "token_logprobs"


def test_compact_keeps_spans(tmp_path):
    examples = conversations(2, 30)
    kw = dict(batch_tokens=40, target_file_bytes=1, compression_level=1)
    with ShardWriter(tmp_path, metadata(), **kw) as w:
        for ex in examples:
            w.add(ex)
            w.flush()
    before = load_manifest(tmp_path)
    assert len(before.files) == 30
    with ShardWriter(tmp_path, metadata(), **{**kw, "target_file_bytes": 1 << 20}) as w:
        (merged,) = w.compact()
    after = load_manifest(tmp_path)
    assert [f.name for f in after.files] == [merged.name]
    assert after.tokens == before.tokens == sum(sum(n for _, n in r.spans) for (r,) in examples)
    want = {r.id: r for (r,) in examples}
    rows = list(read_rows(tmp_path))
    assert len(rows) == 30
    for r in rows:
        assert_conversation_matches(r, want[r["id"]])
    # Record batches of about batch_tokens trained tokens.
    with pa.ipc.open_file(tmp_path / merged.name) as f:
        sums = [
            sum(sum(x) for x in f.get_batch(i)["span_lengths"].to_pylist())
            for i in range(f.num_record_batches)
        ]
    assert all(s >= 40 for s in sums[:-1]) and len(sums) > 1


def test_damaged_span_column_named(tmp_path):
    """A file whose spans point outside its row (checksums made to agree) is refused naming
    the row and field, not read out of bounds."""
    write_examples(tmp_path, conversations(4, 5))
    (entry,) = load_manifest(tmp_path).files
    p = tmp_path / entry.name
    with pa.ipc.open_file(p) as f:
        schema, batch = f.schema, f.get_batch(0)
    starts = batch["span_starts"].to_pylist()
    starts[3] = [s + 1000 for s in starts[3]]
    i = schema.get_field_index("span_starts")
    batch = batch.set_column(i, schema.field(i), pa.array(starts, pa.list_(pa.int32())))
    from tests.shards_helpers import manifest_json, write_arrow, write_manifest_json

    fields = write_arrow(p, schema, [batch])
    d = manifest_json(tmp_path)
    d["files"][0].update(fields)
    write_manifest_json(tmp_path, d)
    with pytest.raises(ShardError, match="spans are not sorted") as err:
        list(read_rows(tmp_path))
    assert err.value.row == 3 and err.value.field == "span_starts"


# ---- outside kdshards: shards.hf, Parquet export and import ------------------------------------


@pytest.fixture(scope="module")
def tiny() -> Path:
    from tests.fixtures.tiny_model import tiny_model_dir

    return tiny_model_dir()


TINY_VOCAB = 512  # the tiny model's


@pytest.fixture(scope="module")
def tiny_meta(tiny):
    from transformers import AutoTokenizer

    from shards.fingerprint import tokenizer_fingerprint

    fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny))
    return ShardMetadata(
        k=8, vocab_size=TINY_VOCAB, teacher="t", teacher_fingerprint="tf", tokenizer_fingerprint=fp
    )


@pytest.fixture(scope="module")
def tiny_conversations():
    return conversations(6, 16, k=8, vocab=TINY_VOCAB)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_meta, tiny_conversations) -> Path:
    path = tmp_path_factory.mktemp("spans") / "shards"
    with ShardWriter(path, tiny_meta, batch_tokens=40, compression_level=1) as w:
        for ex in tiny_conversations:
            w.add(ex)
    return path


def test_hf_load_carries_spans(tiny_folder, tiny_meta, tiny_conversations):
    import shards.hf

    want = {r.id: r for (r,) in tiny_conversations}
    ds = shards.hf.load(tiny_folder)
    assert len(ds) == len(want)
    for name in ("span_starts", "span_lengths", "turn_starts", "turn_roles"):
        assert name in ds.column_names
    for got in ds:
        assert_conversation_matches(got, want[got["id"]], tiny_meta.codebook)
        assert len(got["topk_ids"]) == sum(got["span_lengths"]) < len(got["response_ids"]) + 1
    assert [r["id"] for r in shards.hf.load(tiny_folder, streaming=True)] == ds["id"]


def test_parquet_round_trip_carries_spans(tiny_folder, tiny, tmp_path):
    import shards.hf
    from tools.shards_exchange import export_parquet, import_parquet

    pq_path = tmp_path / "x.parquet"
    export_parquet(tiny_folder, pq_path)
    s = import_parquet(pq_path, tiny, tmp_path / "back")
    original = {r["id"]: r for r in shards.hf.load(tiny_folder)}
    assert (s.rows, s.rejects) == (len(original), 0)
    assert s.tokens == sum(sum(r["span_lengths"]) for r in original.values())
    for g in shards.hf.load(tmp_path / "back"):
        r = original[g["id"]]
        for name in (
            "prompt_ids", "response_ids", "span_starts", "span_lengths", "turn_starts",
            "turn_roles", "token_logprob",
        ):  # fmt: skip
            assert g[name] == r[name], name
        a, b = np.argsort(r["topk_ids"], axis=1), np.argsort(g["topk_ids"], axis=1)
        np.testing.assert_array_equal(
            np.take_along_axis(np.asarray(g["topk_logprobs"]), b, 1),
            np.take_along_axis(np.asarray(r["topk_logprobs"]), a, 1),
        )


def test_parquet_without_span_columns_imports_as_one_span(tmp_path, tiny, tiny_meta):
    """An older export (no span or turn columns): one span per row, no turns."""
    import pyarrow.parquet as pq

    import shards.hf
    from tools.shards_exchange import export_parquet, import_parquet

    examples = make_examples(4, 6, k=8, vocab=TINY_VOCAB, max_samples=1)
    with ShardWriter(tmp_path / "single", tiny_meta, compression_level=1) as w:
        for ex in examples:
            w.add(ex)
    export_parquet(tmp_path / "single", tmp_path / "x.parquet")
    table = pq.read_table(tmp_path / "x.parquet")
    old = table.drop_columns(["span_starts", "span_lengths", "turn_starts", "turn_roles"])
    pq.write_table(old, tmp_path / "old.parquet")
    s = import_parquet(tmp_path / "old.parquet", tiny, tmp_path / "back")
    assert (s.rows, s.rejects) == (6, 0)
    for g in shards.hf.load(tmp_path / "back"):
        p, t = len(g["prompt_ids"]), len(g["response_ids"])
        assert (g["span_starts"], g["span_lengths"]) == (([p], [t]) if t else ([], []))
        assert (g["turn_starts"], g["turn_roles"]) == ([], [])


@pytest.mark.parametrize(
    "field, spoil, reason",
    [
        ("span_starts", lambda r: r.update(span_starts=[r["span_starts"][0] + 1]), "span 0"),
        ("span_lengths", lambda r: r.update(span_lengths=r["span_lengths"] + [1]), "entries"),
        ("span_lengths", lambda r: r.update(span_lengths=None), "given without span_lengths"),
        ("turn_roles", lambda r: r.update(turn_roles=[""] * len(r["turn_starts"])), "role"),
    ],
)
def test_parquet_import_names_bad_spans(tiny_folder, tiny, tmp_path, field, spoil, reason):
    import pyarrow.parquet as pq

    from precompute.inputs import InputError
    from tools.shards_exchange import export_parquet, import_parquet

    export_parquet(tiny_folder, tmp_path / "x.parquet")
    rows = pq.read_table(tmp_path / "x.parquet").to_pylist()
    spoil(rows[2])
    src = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)  # nullable columns, as other tools write
    with pytest.raises(InputError) as e:
        import_parquet(src, tiny, tmp_path / "a")
    assert f"{src}:row 2: {field}: " in str(e.value) and reason in str(e.value)


# ---- tools.shards inspect and stats --------------------------------------------------------------


def test_stats_counts_trained_and_context_tokens(tmp_path, capsys):
    from tools import shards as cli

    examples = conversations(9, 12) + make_examples(10, 3)
    write_examples(tmp_path, examples, batch_tokens=50)
    rows = [r for ex in examples for r in ex]
    trained = sum(len(span_tokens(r)) if r.spans else len(r.response_ids) for r in rows)
    conv = sum(len(r.prompt_ids) + len(r.response_ids) for r in rows)
    assert cli.main(["stats", str(tmp_path), "--json"]) == 0
    import json

    got = json.loads(capsys.readouterr().out)
    assert got["rows"] == len(rows)
    assert got["turns"] == sum(len(r.turns or []) for r in rows)
    assert got["spans"] == sum(len(r.spans) if r.spans else 1 for r in rows)
    assert got["trained_tokens"] == trained
    assert got["context_tokens"] == conv - trained
    assert got["response_tokens"] == sum(len(r.response_ids) for r in rows)
    # Coverage per trained token, from the written top-k.
    written = np.concatenate([np.asarray(r.topk_logprobs, np.float64) for r in rows])
    assert len(written) == trained
    assert got["topk_mass_mean"] == pytest.approx(np.exp(written).sum(1).mean(), abs=1e-3)
    in_topk = np.concatenate(
        [
            (
                np.asarray(r.topk_ids) == (span_tokens(r) if r.spans else r.response_ids)[:, None]
            ).any(1)
            for r in rows
        ]
    )
    assert got["response_in_topk"] == pytest.approx(in_topk.mean())
    assert cli.main(["stats", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"trained tokens          {trained:,} in" in out
    assert f"context tokens          {conv - trained:,} (" in out


def test_inspect_shows_turns_and_trained_spans(tmp_path, capsys):
    from tools import shards as cli

    examples = conversations(12, 4)
    write_examples(tmp_path, examples)
    row = max((r for (r,) in examples), key=lambda r: len(r.spans))
    assert len(row.spans) >= 2
    index = [r.id for (r,) in examples].index(row.id)
    assert cli.main(["inspect", str(tmp_path), "--row", str(index), "--top", "2"]) == 0
    out = capsys.readouterr().out
    conv = np.concatenate([np.asarray(row.prompt_ids), np.asarray(row.response_ids)]).tolist()
    ends = [s for s, _ in row.turns[1:]] + [len(conv)]
    for i, ((start, role), end) in enumerate(zip(row.turns, ends, strict=True)):
        (head,) = [x for x in out.splitlines() if x.startswith(f"--- turn {i}: {role} (")]
        assert f"tokens {start}-{end}" in head
        body = out.splitlines()[out.splitlines().index(head) + 1]
        # Each turn's ids, trained ones between the markers.
        assert body.replace("⟦", "").replace("⟧", "") == " ".join(map(str, conv[start:end]))
        trained = role == "assistant"
        assert body.startswith("⟦") == trained and body.endswith("⟧") == trained
        assert (f", trained {start}-{end}" in head) == trained
    # The per-token table lists the trained tokens only, at their response positions.
    lines = out.splitlines()
    start = next(i for i, x in enumerate(lines) if x.lstrip().startswith("pos"))
    table = [x for x in lines[start + 2 :] if not x.startswith("span ")]
    p = len(row.prompt_ids)
    want = [s - p + j for s, n in row.spans for j in range(n)]
    assert [int(x.split()[0]) for x in table] == want
    assert [int(x.split()[1]) for x in table] == [conv[p + t] for t in want]
    tok = np.asarray(row.token_logprobs)
    target, bound = quantization_bound(metadata().codebook, tok)
    shown = np.array([float(x.split()[2]) for x in table])
    assert (np.abs(shown - target) <= bound + 5e-4).all()  # printed to 3 decimals
    spans = [x for x in lines[start + 2 :] if x.startswith("span ")]
    assert spans == [f"span {j}: response positions {s - p}-{s - p + n}"
                     for j, (s, n) in enumerate(row.spans)]  # fmt: skip
