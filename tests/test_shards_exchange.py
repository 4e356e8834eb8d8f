"""Shards outside kdshards: shards.hf (decoded `datasets` views), Parquet export read by
polars, Parquet import with per-row validation, and the round trip shards -> Parquet ->
shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import shards.hf
from precompute.inputs import InputError
from shards.codec import Codebook
from shards.fingerprint import tokenizer_fingerprint
from shards.manifest import load_manifest
from shards.reader import read_rows
from shards.schema import ShardMetadata
from shards.writer import ShardWriter
from tests.fixtures.tiny_model import tiny_model_dir
from tests.shards_helpers import assert_row_matches, make_examples, quantization_bound, row_key
from tools import shards as cli
from tools.shards_exchange import export_parquet, import_parquet

K = 8
VOCAB = 512  # the tiny model's
WRITER = dict(batch_tokens=150, target_file_bytes=6_000, compression_level=1)


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_model_dir()


@pytest.fixture(scope="module")
def meta(tiny) -> ShardMetadata:
    from transformers import AutoTokenizer

    fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny))
    return ShardMetadata(
        k=K, vocab_size=VOCAB, teacher="t", teacher_fingerprint="tf", tokenizer_fingerprint=fp,
        sampling={"mode": "generate", "n": 2}, data_fingerprint="df",
    )  # fmt: skip


@pytest.fixture(scope="module")
def examples():
    return make_examples(5, 24, k=K, vocab=VOCAB)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, meta, examples) -> Path:
    path = tmp_path_factory.mktemp("exchange") / "shards"
    with ShardWriter(path, meta, **WRITER) as w:
        for rows in examples:
            w.add(rows)
    assert len(list(path.glob("part-*.arrow"))) >= 2
    return path


def written(examples) -> dict:
    return {(r.id, r.sample_index): r for rows in examples for r in rows}


def test_hf_load_gives_the_decoded_rows(folder, meta, examples):
    want = written(examples)
    ds = shards.hf.load(folder)
    assert len(ds) == len(want)
    assert ds.column_names == shards.hf.DECODED_SCHEMA.names
    for got in ds:
        assert_row_matches(got, want[row_key(got)], meta.codebook)
    stream = shards.hf.load(folder, streaming=True)
    # One shard per file: DataLoader workers (and `split_dataset_by_node`) divide the files.
    assert stream.num_shards == len(list(folder.glob("part-*.arrow")))
    streamed = list(stream)
    assert [row_key(r) for r in streamed] == [row_key(r) for r in ds]
    first = streamed[0]
    assert np.asarray(first["topk_ids"]).shape == (len(first["response_ids"]), K)
    assert_row_matches(first, want[row_key(first)], meta.codebook)


def test_hf_rows_equal_the_trainer_reader(folder):
    by_key = {row_key(r): r for r in read_rows(folder)}
    for got in shards.hf.load(folder):
        ref = by_key[row_key(got)]
        for name in ("response_ids", "topk_ids", "topk_logprobs", "tail_logprob", "token_logprob"):
            np.testing.assert_array_equal(np.asarray(got[name]), ref[name].numpy())


def test_export_is_plain_parquet_that_polars_reads(folder, tmp_path):
    import polars as pl

    out = tmp_path / "x.parquet"
    assert cli.main(["export", str(folder), "--format", "parquet", "--out", str(out)]) == 0
    df = pl.read_parquet(out)
    assert df.schema["response_ids"] == pl.List(pl.Int32)
    assert df.schema["topk_ids"] == pl.List(pl.List(pl.Int32))
    assert df.schema["topk_logprobs"] == pl.List(pl.List(pl.Float32))
    assert df.schema["token_logprob"] == pl.List(pl.Float32)
    ref = {row_key(r): r for r in shards.hf.load(folder)}
    assert df.height == len(ref)
    for got in df.iter_rows(named=True):
        r = ref[row_key(got)]
        for name in ("prompt_ids", "response_ids", "topk_ids", "topk_logprobs", "tail_logprob"):
            assert got[name] == r[name], name
    # Token-level questions without kdshards: mean teacher logprob of the sampled tokens.
    mean = df.select(pl.col("token_logprob").explode().mean()).item()
    naive = np.mean([x for r in ref.values() for x in r["token_logprob"]], dtype=np.float64)
    assert mean == pytest.approx(naive, rel=1e-6)


def test_round_trip_shards_parquet_shards(folder, tmp_path, tiny, meta):
    pq_path = tmp_path / "x.parquet"
    export_parquet(folder, pq_path)
    back = tmp_path / "back"
    s = import_parquet(pq_path, tiny, back)
    original = {row_key(r): r for r in shards.hf.load(folder)}
    assert (s.rows, s.rejects, s.k) == (len(original), 0, K)
    again = {row_key(r): r for r in shards.hf.load(back)}
    assert again.keys() == original.keys()
    for key, r in original.items():
        g = again[key]
        for name in ("id", "source", "thinking", "meta", "prompt_ids", "teacher_prompt_ids"):
            assert g[name] == r[name], name
        ids, got_ids = np.asarray(r["topk_ids"]), np.asarray(g["topk_ids"])
        a, b = np.argsort(ids, axis=1), np.argsort(got_ids, axis=1)
        same = np.testing.assert_array_equal
        same(np.take_along_axis(got_ids, b, 1), np.take_along_axis(ids, a, 1))
        lps, got_lps = np.asarray(r["topk_logprobs"]), np.asarray(g["topk_logprobs"])
        # Decoded levels re-encode to themselves: the top-k is the same, bit for bit.
        same(np.take_along_axis(got_lps, b, 1), np.take_along_axis(lps, a, 1))
        np.testing.assert_array_equal(g["token_logprob"], r["token_logprob"])
        # The writer derives the tail from the top-k it is given, here the decoded (quantized)
        # one, so the tail is that of the exported top-k, not the original float32 one.
        implied = np.maximum(1.0 - np.exp(lps.astype(np.float64)).sum(axis=1), 0.0)
        np.testing.assert_allclose(np.exp(g["tail_logprob"]), implied, rtol=0, atol=1e-3)
        np.testing.assert_allclose(np.exp(g["tail_logprob"]), np.exp(r["tail_logprob"]), atol=0.05)
    m = load_manifest(back).metadata
    assert (m.teacher, m.teacher_fingerprint, m.sampling) == ("t", "tf", meta.sampling)
    # Re-running resumes: nothing is written twice.
    s2 = import_parquet(pq_path, tiny, back)
    assert (s2.rows, s2.skipped_done) == (0, len(original))
    assert len(list(read_rows(back))) == len(original)


def plain_rows(rng, n: int, width: int) -> list[dict]:
    """What another tool might have captured: top-`width` logprobs, most probable first."""
    rows = []
    for i in range(n):
        t = int(rng.integers(1, 12))
        logits = rng.normal(0, 3, (t, VOCAB))
        lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        top = np.argsort(-lp, axis=1)[:, :width]
        resp = top[np.arange(t), rng.integers(0, width, t)]
        rows.append(
            {
                "id": f"q{i}",
                "prompt_ids": rng.integers(0, VOCAB, 5).tolist(),
                "response_ids": resp.tolist(),
                "topk_ids": top.tolist(),
                "topk_logprobs": np.take_along_axis(lp, top, 1).tolist(),
                "tail_logprob": np.log1p(-np.exp(np.take_along_axis(lp, top, 1)).sum(1)).tolist(),
            }
        )
    return rows


def write_plain(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_import_of_plain_parquet_keeps_the_k_most_probable(tmp_path, tiny):
    rows = plain_rows(np.random.default_rng(0), 6, width=6)
    src = write_plain(tmp_path / "plain.parquet", rows)
    out = tmp_path / "shards"
    argv = ["import", str(src), "--tokenizer", str(tiny), "--out", str(out), "--k", "4"]
    assert cli.main(argv) == 0
    got = {r["id"]: r for r in shards.hf.load(out)}
    for r in rows:
        g = got[r["id"]]
        want = np.asarray(r["topk_ids"])[:, :4]  # the input was sorted by probability
        np.testing.assert_array_equal(np.sort(g["topk_ids"], 1), np.sort(want, 1))
        assert g["teacher_prompt_ids"] == r["prompt_ids"] and g["source"] == "teacher"
        # The response token is in the top-6 but maybe not the top-4: its logprob is kept.
        lp = np.asarray(r["topk_logprobs"])
        tok = lp[np.asarray(r["topk_ids"]) == np.asarray(r["response_ids"])[:, None]]
        target, bound = quantization_bound(Codebook.for_k(4), tok)
        assert (np.abs(np.asarray(g["token_logprob"]) - target) <= bound).all()


BAD = {
    "positive logprob": ("topk_logprobs", lambda r: r["topk_logprobs"][0].__setitem__(1, 0.5)),
    "id outside the vocabulary": ("topk_ids", lambda r: r["topk_ids"][0].__setitem__(2, VOCAB)),
    "duplicate top-k id": (
        "topk_ids",
        lambda r: r["topk_ids"][0].__setitem__(3, r["topk_ids"][0][2]),
    ),
    "ragged top-k": ("topk_ids", lambda r: r["topk_ids"][0].pop()),
    "tail disagrees": ("tail_logprob", lambda r: r["tail_logprob"].__setitem__(0, -1e-4)),
    "short response": ("topk_logprobs", lambda r: r["topk_logprobs"].append([-1.0] * 6)),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_row_is_named_by_file_row_and_field(tmp_path, tiny, case, capsys):
    field, spoil = BAD[case]
    rows = plain_rows(np.random.default_rng(1), 5, width=6)
    spoil(rows[3])
    src = write_plain(tmp_path / "in.parquet", rows)
    with pytest.raises(InputError) as e:
        import_parquet(src, tiny, tmp_path / "a", k=6)
    assert f"{src}:row 3: {field}: " in str(e.value)
    s = import_parquet(src, tiny, tmp_path / "b", k=6, skip_invalid=True)
    assert (s.rows, s.rejects) == (4, 1)
    (rec,) = [json.loads(x) for x in Path(s.rejects_file).read_text().splitlines()]
    assert (rec["where"], rec["field"]) == (f"{src}, row 3", field)
    assert sorted(r["id"] for r in shards.hf.load(tmp_path / "b")) == ["q0", "q1", "q2", "q4"]
    capsys.readouterr()
    assert cli.main(["verify", str(tmp_path / "b")]) == 0  # rejects committed: no warning
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ok:"), lines


def test_import_refuses_a_missing_column_and_another_tokenizer(folder, tmp_path, tiny):
    rows = plain_rows(np.random.default_rng(2), 2, width=4)
    for r in rows:
        del r["topk_logprobs"]
    with pytest.raises(Exception, match="topk_logprobs"):
        import_parquet(write_plain(tmp_path / "m.parquet", rows), tiny, tmp_path / "m")
    exported = tmp_path / "e.parquet"
    export_parquet(folder, exported)
    other = tiny_model_dir(vocab_size=576)
    with pytest.raises(Exception, match="tokenizer"):
        import_parquet(exported, other, tmp_path / "o")
