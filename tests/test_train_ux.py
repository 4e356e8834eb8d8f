"""Training as HF and TRL users expect it: --help from the dataclasses, one-line config errors,
resume=auto and refused run folders, save_total_limit, num_epochs, the data.overlong policy."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing

import pytest
import yaml

from shards.errors import ShardError
from shards.reader import ShardReader
from tests.fixtures.tiny_model import build_tiny_model, tiny_model_dir
from tests.shards_helpers import REPO
from tests.train_helpers import train_tiny, write_teacher_shards
from train.batches import ShardBatches
from train.checkpoint import prune_checkpoints, resume_from
from train.config import ConfigError, TrainConfig, dump_config, load_config
from train.logger import keep_until


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_teacher_shards(tmp_path_factory.mktemp("shards") / "s", tiny_model_dir())


def train_cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=cwd,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---- --help and config errors --------------------------------------------------------------


def every_field(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from every_field(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f


def test_help_lists_every_key_with_type_default_and_meaning():
    proc = train_cli("--help")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    keys = list(every_field(TrainConfig))
    assert len(keys) > 60 and {"loss.beta", "data.overlong", "num_epochs"} <= dict(keys).keys()
    for key, f in keys:
        assert f.metadata.get("help"), f"{key} has no help text"
        (i,) = [i for i, line in enumerate(lines) if line.startswith(f"  {key} (")]
        assert "default " in lines[i], lines[i]
        assert lines[i + 1].strip() == f.metadata["help"], key
    assert (
        "  loss.divergence (forward_kl | reverse_kl | jsd | dual_kl, default 'forward_kl')" in lines
    )


@pytest.mark.parametrize(
    "args,error",
    [
        (["loss.betta=0.5"], "unknown config key(s) loss.betta"),
        (["max_steps=many"], "max_steps: expected an integer, got 'many'"),
        (["resume=maybe"], "resume: expected one of auto | true | false"),
        (
            ["data.overlong=cut"],
            "data.overlong: expected one of skip | truncate | drop_turns | error",
        ),
        (["num_epochs=-1"], "num_epochs and save_total_limit must be >= 0"),
    ],
)
def test_config_errors_are_one_line_with_status_2(args, error):
    proc = train_cli("configs/train/skd.yaml", *args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("train: error: ") and error in line, line


def test_a_missing_config_file_is_one_line(tmp_path):
    proc = train_cli(str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "nope.yaml" in line


# ---- resume=auto, refused folders, save_total_limit ----------------------------------------


def fake_run(out, cfg: TrainConfig, steps=(2, 4)):
    """A run folder as save_checkpoint leaves it: step folders, `latest`, configs."""
    root = out / "checkpoints"
    for s in steps:
        (root / f"step-{s:07d}" / "model").mkdir(parents=True)
        dump_config(cfg, root / f"step-{s:07d}" / "config.yaml")
    (root / "latest").write_text(f"step-{steps[-1]:07d}")
    dump_config(cfg, out / "config.yaml")


def test_resume_auto_continues_and_other_settings_are_refused(tmp_path):
    out = tmp_path / "run"
    base = ["loss.beta=0.3", f"out_dir={out}"]
    cfg = load_config("configs/train/jsd.yaml", base)
    assert cfg.resume == "auto"
    assert resume_from(cfg) is None  # no folder yet: a fresh start
    out.mkdir()
    assert resume_from(cfg) is None  # an empty folder too
    fake_run(out, cfg)
    assert resume_from(cfg).name == "step-0000004"
    # How long or how often may change: a run is continued with more steps.
    longer = load_config("configs/train/jsd.yaml", [*base, "max_steps=500", "stop_at=9"])
    assert resume_from(longer).name == "step-0000004"
    assert resume_from(load_config("configs/train/jsd.yaml", [*base, "resume=true"]))
    other = load_config("configs/train/jsd.yaml", [*base, "loss.beta=0.6", "seed=3"])
    with pytest.raises(ConfigError, match="other settings") as e:
        resume_from(other)
    assert "loss.beta: 0.3 -> 0.6" in str(e.value) and "seed: 0 -> 3" in str(e.value)
    assert "max_steps" not in str(e.value)
    with pytest.raises(ConfigError, match="resume=false would overwrite it"):
        resume_from(load_config("configs/train/jsd.yaml", [*base, "resume=false"]))


def test_a_saved_config_without_newer_keys_counts_their_defaults(tmp_path):
    out = tmp_path / "run"
    cfg = load_config("configs/train/skd.yaml", [f"out_dir={out}"])
    fake_run(out, cfg)
    saved = out / "checkpoints" / "step-0000004" / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    del old["data"]["overlong"], old["num_epochs"]
    saved.write_text(yaml.safe_dump(old))
    assert resume_from(cfg).name == "step-0000004"
    with pytest.raises(ConfigError, match="data.overlong: 'skip' -> 'error'"):
        resume_from(
            load_config("configs/train/skd.yaml", [f"out_dir={out}", "data.overlong=error"])
        )


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path))
    fake_run(tmp_path, cfg, steps=(2, 4, 6, 8))
    root = tmp_path / "checkpoints"
    (root / ".step-0000010.tmp").mkdir()  # being written: not complete, not touched
    (root / ".step-0000001.deleting").mkdir()  # a deletion a kill interrupted
    gone = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in gone] == ["step-0000002", "step-0000004"]
    assert sorted(p.name for p in root.iterdir()) == [
        ".step-0000010.tmp",
        "latest",
        "step-0000006",
        "step-0000008",
    ]
    # `latest` names step 6 (step 8 was written by a run that went on, then rewound):
    # nothing newer than latest goes, latest itself stays.
    (root / "latest").write_text("step-0000006")
    assert prune_checkpoints(tmp_path, 1) == []
    assert (root / "step-0000006").exists() and (root / "step-0000008").exists()


def test_metrics_after_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)))
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # cut by a kill
    keep_until(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    keep_until(path, 0)
    assert path.read_text() == ""


# ---- data.overlong and epochs --------------------------------------------------------------


def batches(shards, overlong, max_length, epochs=1):
    reader = ShardReader(shards, seed=1, epochs=epochs)
    return ShardBatches(
        reader,
        batch_tokens=400,
        max_rows=4,
        max_length=max_length,
        sort_window=10,
        overlong=overlong,
    )


def row_lengths(shards) -> dict[str, tuple[int, int]]:
    return {
        r["id"]: (len(r["prompt_ids"]), len(r["response_ids"]))
        for r in ShardReader(shards, shuffle=False)
    }


def test_overlong_rows_are_skipped_truncated_or_refused_and_counted(shards):
    lengths = row_lengths(shards)
    total = {i: p + r for i, (p, r) in lengths.items()}
    limit = sorted(total.values())[len(total) // 2]  # about half the rows are longer
    long = {i for i, n in total.items() if n > limit}
    assert 0 < len(long) < len(total)

    source = batches(shards, "skip", limit)
    got = list(source)
    for b in got:
        source.update(b)
    assert sorted(i for b in got for i in b.ids) == sorted(set(total) - long)
    assert source.pop_metrics() == {
        "overlong_rows": len(long),
        "overlong_tokens": sum(total[i] for i in long),
    }

    source = batches(shards, "truncate", limit)
    got = list(source)
    for b in got:
        source.update(b)
    assert sorted(i for b in got for i in b.ids) == sorted(total)
    assert max(int(b.attention_mask.sum(1).max()) for b in got) <= limit
    assert source.pop_metrics() == {
        "overlong_rows": len(long),
        "overlong_tokens": sum(total[i] - limit for i in long),
    }

    with pytest.raises(ShardError, match=f"longer than data.max_length={limit}") as e:
        list(batches(shards, "error", limit))
    assert str(shards) in str(e.value) and "field 'prompt_ids+response_ids'" in str(e.value)
    # Within the limit, the policies are the same batches.
    a = [b.ids for b in batches(shards, "error", 10_000)]
    assert a == [b.ids for b in batches(shards, "skip", 10_000)]


def test_overlong_counts_resume_without_double_counting(shards):
    total = {i: p + r for i, (p, r) in row_lengths(shards).items()}
    limit = sorted(total.values())[len(total) // 2]
    full = batches(shards, "skip", limit)
    every = list(full)
    for b in every:
        full.update(b)
    for cut in (1, 3, len(every) - 1):
        first = batches(shards, "skip", limit)
        it = iter(first)
        for _ in range(cut):
            first.update(next(it))
        resumed = batches(shards, "skip", limit)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        rest = list(resumed)
        for b in rest:
            resumed.update(b)
        assert [b.ids for b in rest] == [b.ids for b in every[cut:]]
        assert resumed.pop_metrics() == full.pop_metrics(), cut


def test_a_batch_never_mixes_epochs_and_each_epoch_has_every_row_once(shards):
    source = batches(shards, "skip", 10_000, epochs=3)
    by_epoch = {}
    for b in source:
        by_epoch.setdefault(b.cursor[1], []).extend(b.ids)
    assert sorted(by_epoch) == [0, 1, 2]
    for ids in by_epoch.values():
        assert sorted(ids) == sorted(row_lengths(shards))


# ---- whole runs ----------------------------------------------------------------------------


def run(out, shards, student, *extra):
    return train_tiny("configs/train/skd.yaml", out, student, shards, *extra)


@pytest.mark.slow  # trains the tiny model for a few dozen steps
def test_num_epochs_trains_every_row_once_and_resumes_mid_epoch(tmp_path, shards, capsys):
    student = build_tiny_model(tmp_path / "student", seed=7)
    tokens = sum(r for _, r in row_lengths(shards).values())
    # grad_accum=5 does not divide the epochs' batches: the last step is a smaller one.
    common = ["num_epochs=2", "max_steps=1000", "save_every=2", "grad_accum=5"]
    straight = run(tmp_path / "a", shards, student, *common)
    assert sum(r["tokens"] for r in straight) == 2 * tokens  # every response token, twice
    steps = straight[-1]["step"]
    assert 3 <= steps < 1000 and [r["step"] for r in straight] == list(range(1, steps + 1))
    assert f"num_epochs=2 done after {steps} steps" in capsys.readouterr().out
    assert (tmp_path / "a" / "checkpoints" / f"step-{steps:07d}").exists()
    run(tmp_path / "b", shards, student, *common, "stop_at=2")
    resumed = run(tmp_path / "b", shards, student, *common)  # resume=auto
    key = [(r["step"], r["loss"], r["tokens"]) for r in straight]
    assert [(r["step"], r["loss"], r["tokens"]) for r in resumed] == key
    again = run(tmp_path / "b", shards, student, *common)  # done: nothing more to train
    assert [(r["step"], r["loss"], r["tokens"]) for r in again] == key


@pytest.mark.slow
def test_save_total_limit_resume_auto_and_a_refused_folder(tmp_path, shards):
    student = build_tiny_model(tmp_path / "student", seed=7)
    out = tmp_path / "run"
    log = run(out, shards, student, "max_steps=5", "save_every=2", "save_total_limit=2")
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000004", "step-0000005"]
    more = run(out, shards, student, "max_steps=7", "save_every=2", "save_total_limit=2")
    assert [r["step"] for r in more] == list(range(1, 8)) and more[:5] == log
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000006", "step-0000007"]
    with pytest.raises(ConfigError, match="loss.alpha: 0.9 -> 0.5"):
        run(out, shards, student, "max_steps=7", "loss.alpha=0.5")


@pytest.mark.slow
def test_overlong_rows_are_logged_and_a_tokenizer_mismatch_says_so(tmp_path, shards):
    student = build_tiny_model(tmp_path / "student", seed=7)
    total = sorted(p + r for p, r in row_lengths(shards).values())
    limit = total[len(total) // 2]
    proc = train_cli(
        "configs/train/skd.yaml",
        f"model.path={student}",
        f"data.shards={shards}",
        f"out_dir={tmp_path / 'run'}",
        "data.batch_tokens=256",
        f"data.max_length={limit}",
        "max_steps=3",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert log[-1]["overlong_rows"] > 0 and log[-1]["overlong_tokens"] > limit
    assert f"data.overlong=skip: rows longer than data.max_length={limit}" in proc.stderr
    assert f"{log[-1]['overlong_rows']} rows longer than data.max_length" in proc.stdout

    other = build_tiny_model(tmp_path / "other", seed=0, vocab_size=576)
    proc = train_cli(
        "configs/train/skd.yaml",
        f"model.path={other}",
        f"data.shards={shards}",
        f"out_dir={tmp_path / 'other-run'}",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("train: error:")]
    assert "another tokenizer than the student's" in line and "bad shard data" not in line
