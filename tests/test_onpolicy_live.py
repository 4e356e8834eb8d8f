"""tools.onpolicy.live's plan: the stages of live and two-stage on-policy, built once (the
end-to-end two-stage run is in tests/test_onpolicy.py, slow)."""

from __future__ import annotations

import pytest

from tests.test_eval import fake_run
from tools.onpolicy import live


def plan(tmp_path, *extra):
    argv = ["--shards", "S", "--out", str(tmp_path / "o"), *extra, "model.path=M", "max_steps=2"]
    return live.stages(live.parser().parse_intermixed_args(argv))


def test_live_starts_a_teacher_server_unless_given_one(tmp_path):
    (onpolicy,) = plan(tmp_path, "--teacher-url", "http://h:1")
    assert onpolicy.services == [] and "onpolicy.teacher_url=http://h:1" in onpolicy.argv()
    assert f"out_dir={tmp_path / 'o'}" in onpolicy.argv()
    (onpolicy,) = plan(tmp_path)
    (server,) = onpolicy.services
    with pytest.raises(RuntimeError, match="teacher server is not running"):
        onpolicy.argv()  # the URL is the started server's


def test_two_stage_starts_on_policy_from_skds_final_weights(tmp_path):
    skd, onpolicy = plan(tmp_path, "--two-stage", "--teacher-url", "http://h:1")
    assert skd.argv()[3:] == [
        "configs/train/skd.yaml", "data.shards=S", f"out_dir={tmp_path / 'o' / 'skd'}",
        "resume=true", "model.path=M", "max_steps=2",
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="finished without a checkpoint"):
        onpolicy.argv()
    _, ck = fake_run(tmp_path / "o", "skd")
    argv = onpolicy.argv()
    # The user's model.path= was SKD's start; SKD's result comes last, and the last wins.
    paths = [a for a in argv if a.startswith("model.path=")]
    assert paths == ["model.path=M", f"model.path={ck / 'model'}"]
    assert f"out_dir={tmp_path / 'o' / 'onpolicy'}" in argv
