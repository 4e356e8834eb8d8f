"""Weighted mixtures of shard folders (train/mixture.py): config, proportions, resume, refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from torch.utils.data import DataLoader

from shards.errors import ShardError
from shards.reader import ShardReader
from tests.fixtures.tiny_model import build_tiny_model, tiny_model_dir
from tests.train_helpers import write_teacher_shards
from train.__main__ import main
from train.batches import ShardBatches
from train.config import ShardSource, dump_config, load_config
from train.mixture import MixtureBatches, choose_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two folders of one teacher with other k and response lengths (short vs long)."""
    root, teacher = tmp_path_factory.mktemp("mix"), tiny_model_dir()
    short = write_teacher_shards(root / "short", teacher, examples=32, k=4, new_tokens=6)
    long = write_teacher_shards(root / "long", teacher, examples=32, k=8, new_tokens=24)
    return short, long


def test_data_shards_spellings(tmp_path):
    one = load_config("configs/train/skd.yaml", ["data.shards=out/a"])
    assert one.data.shards == (ShardSource("out/a", 1.0),)
    kv = load_config("configs/train/skd.yaml", ["data.shards=a:0.7,s3://b/c:0.3"])
    assert kv.data.shards == (ShardSource("a", 0.7), ShardSource("s3://b/c", 0.3))
    assert load_config(None, ["data.shards=s3://bucket/x"]).data.shards[0].path == "s3://bucket/x"
    y = tmp_path / "mix.yaml"
    y.write_text("data:\n  shards: [{path: a, weight: 0.7}, {path: b, weight: 0.3}, c]\n")
    cfg = load_config(y)
    assert [(s.path, s.weight) for s in cfg.data.shards] == [("a", 0.7), ("b", 0.3), ("c", 1.0)]
    dump_config(cfg, tmp_path / "again.yaml")  # what a checkpoint stores loads back the same
    assert load_config(tmp_path / "again.yaml") == cfg
    with pytest.raises(ValueError, match="weight must be > 0"):
        load_config(None, ["data.shards=a:0.7,b:0"])
    with pytest.raises(ValueError, match="listed twice"):
        load_config(None, ["data.shards=a,a"])
    y.write_text("data:\n  shards: [{path: a, wieght: 1}]\n")
    with pytest.raises(ValueError, match=r"data.shards.wieght"):
        load_config(y)


def test_draws_follow_weights_over_mean_tokens_within_binomial_bound():
    # Folder 0's batches carry 10 tokens, folder 1's 30: by tokens, 0.7/0.3 of the tokens
    # means P(0) = (0.7/10) / (0.7/10 + 0.3/30) = 0.875 of the batches.
    w, n = np.array([0.7, 0.3]), 4000
    hits = sum(choose_folder(5, i, w, [100, 300], [10, 10]) == 0 for i in range(n))
    p = 0.875
    assert abs(hits - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)), hits
    # Nothing drawn yet: the weights as they are; and the draw is a function of (seed, n).
    first = [choose_folder(5, i, w, [0, 0], [0, 0]) for i in range(n)]
    assert abs(first.count(0) - 0.7 * n) <= 4.5 * math.sqrt(n * 0.21)
    assert first == [choose_folder(5, i, w, [0, 0], [0, 0]) for i in range(n)]


def make_mixture(folders, weights=(0.7, 0.3), seed=3):
    parts = [
        ShardBatches(
            ShardReader(f, seed=seed, epochs=None),
            batch_tokens=160,
            max_rows=4,
            max_length=512,
            sort_window=8,
            seed=seed,
        )
        for f in folders
    ]
    return MixtureBatches(parts, [str(f) for f in folders], list(weights), seed=seed)


def test_token_shares_follow_weights_within_sampling_error(folders):
    mix, n = make_mixture(folders), 600
    it = iter(mix)
    for _ in range(n):
        mix.update(next(it))
    n0, n1 = mix.batches
    m0, m1 = mix.tokens[0] / n0, mix.tokens[1] / n1
    assert m1 > 2 * m0  # the long folder's batches carry more tokens: by batches would differ
    # Batch counts are binomial given the folders' mean tokens per batch (4.5 sigma) ...
    p = (0.7 / m0) / (0.7 / m0 + 0.3 / m1)
    slack = 4.5 * math.sqrt(n * p * (1 - p))
    assert abs(n0 - n * p) <= slack, (n0, n * p)
    # ... and a count within the bound puts the token share within the image of the bound.
    share = mix.tokens[0] / sum(mix.tokens)
    lo, hi = ((n * p + d) * m0 / ((n * p + d) * m0 + (n - n * p - d) * m1) for d in (-slack, slack))
    assert lo <= share <= hi and lo < 0.7 < hi, (lo, share, hi)
    assert mix.pop_metrics() == {"mix/short": share, "mix/long": 1 - share}


def test_mixture_reads_through_one_loader_per_folder(folders):
    # bind(load): every folder gets its own loader (DataLoader and workers in training), and
    # the mixture's batches are those loaders' batches, in the order of a bare mixture.
    bare = make_mixture(folders)
    reference = [(b.folder, b.ids) for b, _ in zip(bare, range(12), strict=False)]
    mix, wrapped = make_mixture(folders), []

    def load(part):
        wrapped.append(part)
        return DataLoader(part, batch_size=None)

    bound = mix.bind(load)
    assert bound is mix and wrapped == mix.parts == mix.folders()
    assert [(b.folder, b.ids) for b, _ in zip(bound, range(12), strict=False)] == reference
    assert mix.after_step(1) is None and mix.close() is None  # no-op hooks of BatchSource


def test_mixture_source_resumes_exactly(folders):
    full = make_mixture(folders)
    it = iter(full)
    reference = [(b.folder, b.ids) for b in (next(it) for _ in range(40))]
    for cut in (1, 7, 23):
        first = make_mixture(folders)
        it = iter(first)
        for _ in range(cut):
            first.update(next(it))
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make_mixture(folders)
        resumed.load_state_dict(state)
        it = iter(resumed)
        assert [(b.folder, b.ids) for b in (next(it) for _ in range(40 - cut))] == reference[cut:]
    with pytest.raises(ValueError, match="weights"):
        make_mixture(folders, weights=(0.5, 0.5)).load_state_dict(state)


def train(tmp_path, folders, *extra):
    out = tmp_path / "run"
    student = build_tiny_model(tmp_path.parent / "student", seed=7)
    main(
        [
            "configs/train/jsd.yaml",
            f"model.path={student}",
            f"data.shards={folders[0]}:0.7,{folders[1]}:0.3",
            f"out_dir={out}",
            "data.batch_tokens=160",
            "data.sort_window=8",
            "optim.warmup_steps=0",
            "optim.lr=3e-3",
            "grad_accum=2",
            "max_steps=6",
            "save_every=3",
            *extra,
        ]
    )
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_mixture_with_other_k_trains_and_resumes_exactly(tmp_path, folders):
    straight = train(tmp_path / "a", folders)
    train(tmp_path / "b", folders, "stop_at=4")
    resumed = train(tmp_path / "b", folders, "resume=true")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    keys = ("step", "loss", "tokens", "mix/short", "mix/long")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]
    assert all(0 < r["mix/short"] < 1 for r in straight)


def test_mixture_of_other_tokenizers_is_refused(tmp_path, folders):
    other_model = build_tiny_model(tmp_path / "other", seed=0, vocab_size=576)
    other = write_teacher_shards(tmp_path / "other-shards", other_model, examples=4, k=4)
    with pytest.raises(ShardError, match="tokenizer fingerprint") as e:
        train(tmp_path, [folders[0], other])
    assert str(other) in str(e.value) and str(folders[0]) in str(e.value)
