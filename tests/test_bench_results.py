"""Result files under bench/results/ name paths relative to the checkout (#19 §6)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.common import relative as checkout_relative

RESULTS = sorted((Path(__file__).resolve().parents[1] / "bench" / "results").glob("*.json"))
# An absolute path into a checkout: some folder, then one of the checkout's own folders.
CHECKOUT_PATH = re.compile(r"(?<![\w.:/])/[^\s'\"=]*/(models|data|runs|reports|configs|\.venv)/")


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_checkout_relative(tmp_path):
    root = tmp_path / "kd"
    result = {
        "teacher": f"{root}/models/t",
        "cmds": [f"{root}/.venv/bin/python -m train --x {root}/out/s", "/elsewhere/models/t"],
        "n": 3,
        "nested": {"p": (f"{root}/data/a.jsonl",)},
    }
    assert checkout_relative(result, root) == {
        "teacher": "models/t",
        "cmds": [".venv/bin/python -m train --x out/s", "/elsewhere/models/t"],
        "n": 3,
        "nested": {"p": ["data/a.jsonl"]},
    }
    assert CHECKOUT_PATH.search("/elsewhere/models/t")
    assert not CHECKOUT_PATH.search("python -m x --teacher models/t http://h:1/runs/x")


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_result_files_have_no_absolute_checkout_paths(path):
    found = [s for s in _strings(json.loads(path.read_text())) if CHECKOUT_PATH.search(s)]
    assert found == [], f"{path.name}: absolute paths into a checkout: {found[:3]}"
