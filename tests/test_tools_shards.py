"""tools/shards.py: inspect, stats and verify on small synthetic shard folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from shards.reader import read_rows
from shards.schema import ShardMetadata
from shards.writer import ShardRow, ShardWriter
from tests.shards_helpers import REPO, log_softmax64, make_examples, write_arrow, write_examples
from tools import shards as cli

K = 16
WRITER = dict(batch_tokens=200, target_file_bytes=20_000)


@pytest.fixture(scope="module")
def examples():
    return make_examples(11, 40, k=K)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, examples) -> Path:
    """Several files of several record batches each."""
    path = tmp_path_factory.mktemp("shards") / "good"
    write_examples(path, examples, k=K, **WRITER)
    assert len(list(path.glob("part-*.arrow"))) >= 3
    return path


@pytest.fixture
def copy(folder, tmp_path) -> Path:
    """A private copy of `folder` to damage."""
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest-w0.json").read_text())


def save(path: Path, m: dict) -> None:
    """Write an edited manifest with running totals that agree, as a writer would have."""
    rows = tokens = 0
    for f in m["files"]:
        rows, tokens = rows + f["rows"], tokens + f["tokens"]
        f.update(rows_total=rows, tokens_total=tokens)
    m.update(rows=rows, tokens=tokens)
    (path / "manifest-w0.json").write_text(json.dumps(m))


# ---- stats -------------------------------------------------------------------------------------


def naive_stats(path: Path) -> dict:
    """The figures of `stats`, recomputed row by row and token by token from read_rows."""
    rows = resp = prompt = tprompt = inside = 0
    cover, entropy = [], []
    for r in read_rows(path):
        rows += 1
        prompt += len(r["prompt_ids"])
        tprompt += len(r["teacher_prompt_ids"])
        for t in range(len(r["response_ids"])):
            resp += 1
            ids = r["topk_ids"][t].numpy()
            lps = r["topk_logprobs"][t].numpy().astype(np.float64)
            tail = float(r["tail_logprob"][t])
            inside += int(int(r["response_ids"][t]) in set(ids.tolist()))
            cover.append(1.0 - np.exp(tail))
            p = np.exp(np.append(lps, tail))
            p = p / p.sum()
            entropy.append(-(p * np.log(p)).sum())
    files = sorted(path.glob("part-*.arrow"))
    size = sum(p.stat().st_size for p in files)
    return {
        "rows": rows,
        "response_tokens": resp,
        "prompt_tokens": prompt,
        "teacher_prompt_tokens": tprompt,
        "files": len(files),
        "bytes_on_disk": size,
        "bytes_per_response_token": size / resp,
        "topk_mass_mean": float(np.mean(cover)),
        "topk_mass_p5": float(np.percentile(cover, 5, method="inverted_cdf")),
        "entropy_mean_nats": float(np.mean(entropy)),
        "response_in_topk": inside / resp,
    }


def test_stats_json_equals_naive_recomputation(folder, examples, capsys):
    code, out, _ = run(capsys, "stats", folder, "--json")
    assert code == 0
    got = json.loads(out)
    want = naive_stats(folder)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
    meta = manifest(folder)["metadata"]
    for key in ("k", "teacher", "teacher_fingerprint", "tokenizer_fingerprint", "created_at"):
        assert got[key] == meta[key]
    assert got["schema_version"] == 2
    # And against the data as written (not only the decoded data): the tail is stored to
    # about 5e-4 of the mass, the response tokens exactly.
    rows = [r for ex in examples for r in ex]
    written = np.concatenate([np.asarray(r.topk_logprobs, np.float64) for r in rows])
    assert got["topk_mass_mean"] == pytest.approx(np.exp(written).sum(1).mean(), abs=1e-3)
    in_topk = np.concatenate(
        [(np.asarray(r.topk_ids) == np.asarray(r.response_ids)[:, None]).any(1) for r in rows]
    )
    assert got["response_in_topk"] == pytest.approx(in_topk.mean())
    assert got["response_tokens"] == sum(len(r.response_ids) for r in rows)


def test_stats_text(folder, capsys):
    code, out, _ = run(capsys, "stats", folder)
    assert code == 0
    for label in ("rows", "response tokens", "bytes / response token", "top-k mass", "entropy"):
        assert label in out
    assert f"{naive_stats(folder)['response_tokens']:,}" in out


def test_stats_counts_responses_cut_at_max_tokens(tmp_path, capsys):
    """Rows whose meta says finish_reason "length" are counted against the rows that have a
    finish reason at all (generated ones); rows without one (scored) are neither."""
    import dataclasses

    rng = np.random.default_rng(5)
    reasons = [None, "stop", "length", "length", "stop", None, "length", "stop", "stop"]
    rows = []
    for i, reason in enumerate(reasons):
        (row,) = make_examples(i, 1, max_samples=1)[0]
        meta = {"answer": int(rng.integers(9))} | ({"finish_reason": reason} if reason else {})
        # A text that names the key but is not one (an answer quoting it) counts nothing.
        if i == 0:
            meta["answer"] = '"finish_reason": "length"'
        rows.append(dataclasses.replace(row, id=f"r{i}", meta=meta))
    meta = ShardMetadata(
        k=16, vocab_size=1000, teacher="t", teacher_fingerprint="t", tokenizer_fingerprint="t",
        sampling={"mode": "generate", "max_tokens": 40},
    )  # fmt: skip
    with ShardWriter(tmp_path / "cut", meta, batch_tokens=100) as w:
        for r in rows:
            w.add([r])
    code, out, _ = run(capsys, "stats", tmp_path / "cut", "--json")
    got = json.loads(out)
    want_cut = sum(r == "length" for r in reasons)
    want_gen = sum(r is not None for r in reasons)
    assert (got["cut_rows"], got["generated_rows"], got["max_tokens"]) == (want_cut, want_gen, 40)
    code, out, _ = run(capsys, "stats", tmp_path / "cut")
    assert code == 0
    (line,) = [x for x in out.splitlines() if x.startswith("cut at max_tokens")]
    assert (
        line.split(None, 3)[3] == f"{want_cut} of {want_gen} generated rows, 42.9% (max_tokens=40)"
    )


def test_stats_empty_folder(tmp_path, capsys):
    ShardWriter(
        tmp_path / "empty",
        ShardMetadata(
            k=4, vocab_size=50, teacher="t", teacher_fingerprint="t", tokenizer_fingerprint="t"
        ),
    ).close()
    code, out, _ = run(capsys, "stats", tmp_path / "empty", "--json")
    assert code == 0
    got = json.loads(out)
    assert got["rows"] == 0 and got["response_tokens"] == 0 and got["topk_mass_p5"] is None
    assert (got["cut_rows"], got["generated_rows"]) == (0, 0)
    assert "n/a (no generated rows)" in cli.render_stats(got)


def test_not_a_shard_folder(tmp_path, capsys):
    code, _, err = run(capsys, "stats", tmp_path)
    assert code == 1
    assert "no manifest" in err


# ---- verify ------------------------------------------------------------------------------------


def test_verify_good_folder(folder, capsys):
    code, out, _ = run(capsys, "verify", folder)
    assert code == 0, out
    assert "BAD" not in out and "WARN" not in out
    assert out.strip().startswith("ok:")


def test_verify_flipped_byte(copy, capsys):
    names = [f["name"] for f in manifest(copy)["files"]]
    victim = copy / names[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    code, out, _ = run(capsys, "verify", copy)
    assert code == 1
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1, out
    assert names[1] in bad[0] and "sha256" in bad[0]


def test_verify_reports_every_bad_file(copy, capsys):
    names = [f["name"] for f in manifest(copy)["files"]]
    (copy / names[0]).unlink()
    with open(copy / names[-1], "ab") as f:
        f.write(b"\0")
    code, out, _ = run(capsys, "verify", copy)
    assert code == 1
    assert f"BAD  {names[0]}: file listed in the manifest is missing" in out
    assert f"BAD  {names[-1]}: length" in out
    assert "2 bad" in out


def test_verify_decodes_every_block(copy, capsys):
    """A file whose sha256 and batch rows match the manifest but whose streams do not agree
    with response_ids is found only by decoding it."""
    m = manifest(copy)
    entry = m["files"][1]
    path = copy / entry["name"]
    with pa.memory_map(str(path)) as src:
        reader = pa.ipc.open_file(src)
        schema = reader.schema
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    last = batches[-1]
    col = last.column("token_level")
    short = pa.ListArray.from_arrays(
        pa.array(np.minimum(col.offsets.to_numpy(), len(col.values) - 1).astype(np.int32)),
        col.values.slice(0, len(col.values) - 1),
    )
    batches[-1] = pa.record_batch(
        [short if n == "token_level" else last.column(n) for n in schema.names], schema=schema
    )
    entry.update(write_arrow(path, schema, batches))
    save(copy, m)
    code, out, _ = run(capsys, "verify", copy)
    assert code == 1
    (line,) = [line for line in out.splitlines() if line.startswith("BAD")]
    assert entry["name"] in line
    assert "token_level" in line and "length disagrees with span_lengths" in line


def test_verify_token_count_against_manifest(copy, capsys):
    m = manifest(copy)
    m["files"][0]["tokens"] += 1
    save(copy, m)
    code, out, _ = run(capsys, "verify", copy)
    assert code == 1
    assert f"BAD  {m['files'][0]['name']}: " in out and "trained tokens" in out


def test_verify_debris_is_a_warning(copy, capsys):
    (copy / ".part-w9-00000.arrow.tmp").write_bytes(b"partial")
    shutil.copy(copy / manifest(copy)["files"][0]["name"], copy / "part-w0-00099.arrow")
    code, out, _ = run(capsys, "verify", copy)
    assert code == 0, out
    warns = [line for line in out.splitlines() if line.startswith("WARN")]
    assert len(warns) == 2
    assert any(".part-w9-00000.arrow.tmp" in w for w in warns)
    assert any("part-w0-00099.arrow" in w for w in warns)


def test_verify_bad_manifest(copy, capsys):
    (copy / "manifest-w0.json").write_text("{not json")
    code, out, _ = run(capsys, "verify", copy)
    assert code == 1
    assert "BAD  manifest-w0.json: unreadable manifest" in out


def test_verify_subprocess(copy):
    good = subprocess.run(
        [sys.executable, "-m", "tools.shards", "verify", str(copy)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stdout + good.stderr
    name = manifest(copy)["files"][0]["name"]
    data = bytearray((copy / name).read_bytes())
    data[100] ^= 0xFF
    (copy / name).write_bytes(bytes(data))
    bad = subprocess.run(
        [sys.executable, "-m", "tools.shards", "verify", str(copy)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert f"BAD  {name}: sha256" in bad.stdout


# ---- inspect -----------------------------------------------------------------------------------


def _table_lines(out: str) -> list[str]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("pos"))
    return [line for line in lines[start + 2 :] if not line.startswith("span ")]


def test_inspect_without_tokenizer(folder, examples, capsys):
    rows = [r for ex in examples for r in ex]
    code, out, _ = run(capsys, "inspect", folder, "--row", 3, "--top", 4, "--positions", "1:4")
    assert code == 0
    row = rows[3]
    assert f"id            {row.id}" in out
    assert f"sample_index  {row.sample_index}" in out
    assert " ".join(map(str, np.asarray(row.response_ids).tolist())) in out
    table = _table_lines(out)
    n = len(row.response_ids)
    assert len(table) == len(range(n)[1:4])
    for t, line in zip(range(n)[1:4], table, strict=True):
        fields = line.split()
        assert int(fields[0]) == t and int(fields[1]) == int(row.response_ids[t])
        # The top-4, most probable first (the file stores them unsorted): each printed
        # probability is the written one up to quantization, and no unprinted entry is more
        # probable than a printed one (beyond quantization: near-ties may swap).
        written = dict(
            zip(
                np.asarray(row.topk_ids[t]).tolist(),
                np.exp(np.asarray(row.topk_logprobs[t], np.float64)).tolist(),
                strict=True,
            )
        )
        shown = [int(x) for x in fields[5:13:2]]
        probs = [float(x) for x in fields[6:14:2]]
        assert probs == sorted(probs, reverse=True)
        for i, p in zip(shown, probs, strict=True):
            assert written[i] == pytest.approx(p, rel=0.03, abs=1e-3)
        rest = [p for i, p in written.items() if i not in shown]
        assert max(rest) <= min(written[i] for i in shown) * 1.03 + 1e-3


def test_inspect_row_out_of_range(folder, capsys):
    with pytest.raises(SystemExit, match="rows"):
        cli.main(["inspect", str(folder), "--row", "100000"])


@pytest.mark.parametrize(
    ("spec", "n", "expected"),
    [(None, 5, range(5)), ("1:3", 5, range(1, 3)), (":2", 5, range(2)), ("-2:", 5, range(3, 5))],
)
def test_parse_positions(spec, n, expected):
    assert list(cli._parse_positions(spec, n)) == list(expected)


@pytest.fixture(scope="module")
def tiny_tokenizer_dir():
    tiny_model = pytest.importorskip("tests.fixtures.tiny_model")
    try:
        return tiny_model.tiny_model_dir()
    except Exception as e:  # pragma: no cover - the builder is someone else's module
        pytest.skip(f"tiny model not buildable: {e}")


@pytest.mark.parametrize("found_by", ["metadata", "committed_config"])
def test_inspect_decodes_with_tokenizer(tiny_tokenizer_dir, tmp_path, capsys, found_by):
    from transformers import AutoTokenizer

    from shards.fingerprint import tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    vocab = len(tok)
    question = "What is the capital of France?"
    answer = "Paris is the capital of France."
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    resp = np.asarray(tok(answer, add_special_tokens=False)["input_ids"], dtype=np.int64)
    rng = np.random.default_rng(0)
    # The response token gets probability 0.6, the rest 0.4 spread as random logits say.
    p = np.exp(log_softmax64(rng.standard_normal((len(resp), vocab)) * 3))
    p[np.arange(len(resp)), resp] = 0.0
    p *= 0.4 / p.sum(1, keepdims=True)
    p[np.arange(len(resp)), resp] = 0.6
    lp = np.log(p)
    ids = np.argsort(-lp, axis=1)[:, :8]
    ids = rng.permuted(ids, axis=1)  # stored in no particular order
    meta = ShardMetadata(
        k=8,
        vocab_size=vocab,
        # precompute writes only the folder's name here; its committed config has the path.
        teacher=str(tiny_tokenizer_dir) if found_by == "metadata" else tiny_tokenizer_dir.name,
        teacher_fingerprint="t",
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
    )
    with ShardWriter(tmp_path / "s", meta) as w:
        if found_by == "committed_config":
            w.add_extra("precompute_config", b"teacher: /no/such/teacher\n", ".yaml")
            w.add_extra("precompute_config", f"teacher: {tiny_tokenizer_dir}\n".encode(), ".yaml")
        w.add(
            ShardRow(
                id="capital",
                prompt_ids=prompt,
                teacher_prompt_ids=prompt,
                response_ids=resp,
                topk_ids=ids,
                topk_logprobs=np.take_along_axis(lp, ids, 1).astype(np.float32),
                meta={"answer": "Paris"},
            )
        )
    # The tokenizer is found through the teacher folder (the metadata's, or the newest
    # committed config's), and given explicitly.
    for extra in ([], ["--tokenizer", str(tiny_tokenizer_dir)]):
        code, out, err = run(capsys, "inspect", tmp_path / "s", "--top", 3, *extra)
        assert code == 0
        assert "warning" not in err
        assert answer in out and question in out
        assert '{"answer": "Paris"}' in out
        table = _table_lines(out)
        assert len(table) == len(resp)
        shown = [line.split()[1] for line in table]
        assert shown == [tok.decode([int(t)]).replace(" ", "␣") for t in resp]
        # The response token holds 0.6 of the mass: rank 1, shown first, p 0.6 up to the
        # codebook's step (0.023 nats here).
        for line in table:
            fields = line.split()
            assert fields[3] == "1" and fields[5] == fields[1]
            assert float(fields[6]) == pytest.approx(0.6, abs=0.01)


def test_inspect_prints_ids_and_says_how_to_decode(folder, capsys):
    """The synthetic folder's teacher is no local folder: ids, and a note naming --tokenizer."""
    code, out, err = run(capsys, "inspect", folder, "--row", 0)
    assert code == 0
    assert "not a local folder" in err and "--tokenizer DIR" in err
