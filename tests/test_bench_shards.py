"""bench/common.py (teacher-forcing top-k, result files) and bench/shards.py (size, accuracy)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import common
from bench import shards as bench
from shards.schema import arrow_schema
from shards.writer import ShardWriter
from tests.shards_helpers import random_distributions


@pytest.fixture(scope="module")
def tiny():
    tiny_model = pytest.importorskip("tests.fixtures.tiny_model")
    import torch
    from transformers import AutoModelForCausalLM

    try:
        path = tiny_model.tiny_model_dir()
    except Exception as e:  # pragma: no cover - the builder is someone else's module
        pytest.skip(f"tiny model not buildable: {e}")
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_teacher_topk_equals_full_forward(tiny):
    import torch

    from precompute.hf_backend import HFBackend

    path, model = tiny
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    prompts = [rng.integers(0, vocab, n).tolist() for n in (5, 1, 9, 3)]
    responses = [rng.integers(0, vocab, n).tolist() for n in (4, 7, 2, 1)]
    k = 12
    got = common.teacher_topk(HFBackend(str(path), k, batch_size=3), prompts, responses)
    for p, r, g in zip(prompts, responses, got, strict=True):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([p + r])).logits[0].double()
        lp = torch.log_softmax(logits, dim=-1)[len(p) - 1 : len(p) + len(r) - 1].numpy()
        assert g["ids"].shape == (len(r), k) and g["ids"].dtype == np.int32
        assert g["logprobs"].dtype == np.float32 and g["token_logprob"].shape == (len(r),)
        want = np.sort(lp, axis=1)[:, ::-1][:, :k]
        np.testing.assert_allclose(g["logprobs"], want, atol=1e-4)
        np.testing.assert_allclose(np.take_along_axis(lp, g["ids"], 1), want, atol=1e-4)
        assert (np.diff(g["logprobs"], axis=1) <= 0).all()  # descending
        np.testing.assert_allclose(g["token_logprob"], lp[np.arange(len(r)), r], atol=1e-4)


def test_results_name_paths_relative_to_the_checkout(tmp_path):
    out = common.write_result(
        tmp_path / "r.json",
        {
            **common.header("bench.shards", ["--k", "64"]),
            "cache": str(common.CACHE_DIR / "x.npz"),
            "paths": [common.REPO / "models" / "m", "/elsewhere/y"],
        },
    )
    got = json.loads(out.read_text())
    assert got["command"] == "python -m bench.shards --k 64"
    assert got["cache"] == "bench/cache/x.npz"
    assert got["paths"] == ["models/m", "/elsewhere/y"]
    assert {"date", "machine", "versions"} <= set(got) and got["machine"]["cores"] >= 1
    assert str(common.REPO) not in out.read_text()


def synthetic_data(n_examples: int = 30, vocab: int = 700, cache_k: int = 40) -> dict:
    """What `teacher_data` returns, from random distributions instead of a teacher."""
    rng = np.random.default_rng(5)
    lens = rng.integers(1, 40, n_examples)
    prompts = [rng.integers(0, vocab, int(rng.integers(1, 10))) for _ in range(n_examples)]
    n = int(lens.sum())
    full = random_distributions(rng, n, vocab)
    ids = np.argsort(-full, axis=1)[:, :cache_k]
    resp = np.where(rng.random(n) < 0.8, ids[:, 0], rng.integers(0, vocab, n))
    return {
        "prompt": np.concatenate(prompts).astype(np.int32),
        "prompt_off": np.concatenate([[0], np.cumsum([len(p) for p in prompts])]),
        "response": resp.astype(np.int32),
        "response_off": np.concatenate([[0], np.cumsum(lens)]),
        "ids": ids.astype(np.int32),
        "logprobs": np.take_along_axis(full, ids, 1).astype(np.float32),
        "token_logprob": full[np.arange(n), resp].astype(np.float32),
        "vocab_size": vocab,
        "teacher": "synthetic",
        "teacher_fingerprint": "t",
        "tokenizer_fingerprint": "tok",
    }


@pytest.mark.parametrize("k", [1, 16])
def test_sizes_and_accuracy(tmp_path, k):
    data = synthetic_data()
    folder = tmp_path / "s"
    with ShardWriter(folder, common.shard_metadata(data, k), batch_tokens=300) as w:
        for row in common.shard_rows(data, k):
            w.add(row)
    files = [folder / e.name for e in w.files_written]
    acc = bench.accuracy(folder, data, k)
    assert acc["tokens"] == len(data["response"])
    assert acc["id_mismatch_tokens"] == 0
    assert 0 <= acc["kl_tail_bucket_mean"] < 2e-4
    # Renormalized, the error is relative to the top-k's mass, which is small for the
    # near-uniform distributions among the synthetic ones.
    assert 0 <= acc["kl_renormalized_mean"] < 2e-3
    assert acc["tail_abs_err_max"] < 1e-3
    cols = bench.column_bytes(files, w.compression_level)
    total = sum(p.stat().st_size for p in files)
    assert set(cols) == set(arrow_schema().names)
    # Each column's compressed buffers, written alone: the file is those plus its framing.
    # Written alone, each column repeats each record batch's framing (a few dozen bytes),
    # which at k=1 (almost empty top-k streams) the 21 columns of schema v2 make up 2%.
    assert 0.5 * total < sum(cols.values()) < 1.02 * total
    naive = bench.naive_bytes(data, k, w.compression_level, w.batch_tokens)
    assert naive["float32"] > naive["float16"] > 0


def test_commit_every_files_merge_into_fewer_bytes(tmp_path):
    out = bench.commit_every_bytes(synthetic_data(), 16, tmp_path, every=2)
    assert out["files"] > 2 and 0 < out["merged"] < out["commit_every"]
