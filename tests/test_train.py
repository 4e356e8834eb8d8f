"""The trainer: config overlay, batching, every method, resume, refusals."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from shards.errors import ShardError
from shards.reader import ShardReader
from tests.fixtures.tiny_model import build_tiny_model, tiny_model_dir
from tests.train_helpers import train_tiny, write_teacher_shards
from train.batches import ShardBatches, collate, plan_batches
from train.config import TrainConfig, load_config


@pytest.fixture(scope="module")
def teacher_dir():
    return tiny_model_dir()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, teacher_dir):
    return write_teacher_shards(tmp_path_factory.mktemp("shards") / "s", teacher_dir)


def run(tmp_path, shards, model, method="skd", *extra):
    out = tmp_path / f"run-{method}"
    return out, train_tiny(f"configs/train/{method}.yaml", out, model, shards, *extra)


# ---- config -------------------------------------------------------------------------------


def test_config_overrides_are_typed_and_unknown_keys_refused(tmp_path):
    cfg = load_config("configs/train/jsd.yaml", ["loss.beta=0.25", "max_steps=7", "seed=3"])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.loss.beta, cfg.max_steps, cfg.seed, cfg.loss.divergence) == (0.25, 7, 3, "jsd")
    with pytest.raises(ValueError, match="loss.betta"):
        load_config("configs/train/jsd.yaml", ["loss.betta=0.5"])
    with pytest.raises(ValueError, match="max_steps: expected an integer"):
        load_config("configs/train/jsd.yaml", ["max_steps=many"])
    with pytest.raises(ValueError, match="loss.beta must be in"):
        load_config("configs/train/jsd.yaml", ["loss.beta=2"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  pth: x\n")
    with pytest.raises(ValueError, match="model.pth"):
        load_config(bad)
    with pytest.raises(dataclasses_frozen_error()):
        cfg.seed = 1


@pytest.mark.parametrize(
    "override,error",
    [
        ("loss.divergence=kl", "loss.divergence: expected one of forward_kl | reverse_kl | jsd"),
        ("optim.schedule=step", "optim.schedule: expected one of cosine | linear | constant"),
        ("loss.reverse_kl_estimator=mc", "loss.reverse_kl_estimator=mc applies to"),
        ("loss.direction=reverse", "loss.direction is now loss.divergence"),
    ],
)
def test_choices_are_typed_and_errors_name_the_key(override, error):
    with pytest.raises(ValueError, match=error.replace("|", r"\|")):
        load_config("configs/train/jsd.yaml", [override])


def test_old_loss_keys_name_their_replacement(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("loss:\n  method: dualkl\n  reverse: mc\n")
    with pytest.raises(ValueError, match="loss.method is now loss.divergence") as e:
        load_config(old)
    assert "loss.reverse is now loss.reverse_kl_estimator" in str(e.value)


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


# ---- batching -----------------------------------------------------------------------------


def test_plan_batches_respects_budget_and_keeps_every_row():
    lengths = [5, 30, 7, 64, 12, 12, 3, 50, 9]
    plan = plan_batches(lengths, batch_tokens=64, max_rows=3)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    for b in plan:
        assert len(b) <= 3
        assert max(lengths[i] for i in b) * len(b) <= 64 or len(b) == 1


def test_collate_aligns_positions_with_response_tokens(shards):
    rows = [r for _, r in zip(range(3), iter(ShardReader(shards, shuffle=False)), strict=False)]
    batch = collate(rows, max_length=1024)
    flat = batch.input_ids.flatten()
    # The token after each trained position is the response token it is trained on.
    assert torch.equal(flat[batch.positions + 1], batch.targets)
    assert batch.num_tokens == sum(len(r["response_ids"]) for r in rows)
    assert torch.equal(batch.topk_ids, torch.cat([r["topk_ids"] for r in rows]).long())
    short = collate(rows, max_length=len(rows[0]["prompt_ids"]) + 2)
    assert short.num_tokens <= 2 * len(rows)
    assert torch.equal(short.input_ids.flatten()[short.positions + 1], short.targets)


def test_batches_cover_each_row_once_per_epoch(shards):
    reader = ShardReader(shards, seed=1, epochs=1)
    source = ShardBatches(reader, batch_tokens=200, max_rows=4, max_length=512, sort_window=10)
    ids = [i for b in source for i in b.ids]
    assert sorted(ids) == sorted(f"ex{i}" for i in range(48))


def test_batch_source_resumes_exactly_mid_window(shards):
    def make():
        reader = ShardReader(shards, seed=2, epochs=2)
        return ShardBatches(reader, batch_tokens=120, max_rows=4, max_length=512, sort_window=9)

    full = [b.ids for b in make()]
    for cut in (1, 3, 7, len(full) - 1):
        first = make()
        it = iter(first)
        for _ in range(cut):
            first.update(next(it))
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make()
        resumed.load_state_dict(state)
        assert [b.ids for b in resumed] == full[cut:], cut


# ---- training -----------------------------------------------------------------------------


# The config files keep the recipes' names; the loss section says what each computes.
RECIPES = {
    "seqkd": dict(alpha=0.0),
    "skd": dict(divergence="forward_kl", alpha=0.9),
    "jsd": dict(divergence="jsd", alpha=1.0),
    "dualkl": dict(divergence="dual_kl", alpha=1.0),
}


@pytest.mark.parametrize("method", list(RECIPES))
def test_every_method_trains_and_lowers_its_loss(tmp_path, shards, method):
    # A student with other random weights than the teacher, so there is something to learn.
    student = build_tiny_model(tmp_path / "student", seed=7)
    out, log = run(tmp_path, shards, student, method, "max_steps=12", "save_every=12")
    losses = [r["loss"] for r in log]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    ckpt = out / "checkpoints" / "step-0000012"
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    assert RECIPES[method].items() <= saved["loss"].items() and saved["max_steps"] == 12
    assert (ckpt / "model" / "config.json").exists()
    if method == "dualkl":
        assert all(0.0 <= r["gate"] <= 1.0 for r in log)


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, shards):
    student = build_tiny_model(tmp_path / "student", seed=7)
    common = ["max_steps=7", "save_every=3"]
    _, straight = run(tmp_path / "a", shards, student, "jsd", *common)
    run(tmp_path / "b", shards, student, "jsd", *common, "stop_at=4")
    _, resumed = run(tmp_path / "b", shards, student, "jsd", *common, "resume=true")
    assert [r["step"] for r in resumed] == list(range(1, 5)) + list(range(5, 8))
    a = [(r["step"], r["loss"], r["tokens"]) for r in straight]
    b = [(r["step"], r["loss"], r["tokens"]) for r in resumed]
    assert b == a


def test_lora_trains_only_the_adapter(tmp_path, shards):
    student = build_tiny_model(tmp_path / "student", seed=7)
    out, log = run(
        tmp_path,
        shards,
        student,
        "skd",
        "max_steps=3",
        "save_every=3",
        "model.lora=true",
        "model.lora_rank=4",
    )
    assert (out / "checkpoints" / "step-0000003" / "model" / "adapter_config.json").exists()


def test_shards_from_another_tokenizer_are_refused(tmp_path, shards):
    other = build_tiny_model(tmp_path / "other", seed=0, vocab_size=576)
    with pytest.raises(ShardError, match="tokenizer fingerprint"):
        run(tmp_path, shards, other, "skd", "max_steps=1")


def test_eval_loss_and_gradient_checkpointing(tmp_path, shards):
    student = build_tiny_model(tmp_path / "student", seed=7)
    extra = ["max_steps=4", "save_every=4", "eval_every=2", f"data.eval_shards={shards}"]
    _, log = run(tmp_path, shards, student, "skd", *extra, "model.gradient_checkpointing=true")
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert len(evals) == 2 and all(v > 0 for v in evals)
    # Same steps without checkpointing: recomputation changes memory, not the numbers.
    _, plain = run(tmp_path / "plain", shards, student, "skd", *extra)
    assert [r["loss"] for r in plain] == pytest.approx([r["loss"] for r in log], rel=1e-5)
