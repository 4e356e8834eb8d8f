"""The vLLM CPU KV-cache default is set in one place (vllm_engine/env.py), and a value the
user set wins."""

from __future__ import annotations

import re
from pathlib import Path

from vllm_engine.env import KVCACHE_SPACE_VAR, default_kvcache_space

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shards", "datafiles", "precompute", "train", "tools", "runtime", "vllm_engine")
PACKAGES += ("bench", "tests")


def test_default_is_set_unless_the_user_set_it():
    assert default_kvcache_space({}) == {KVCACHE_SPACE_VAR: "1"}
    assert default_kvcache_space({KVCACHE_SPACE_VAR: "4"}) == {KVCACHE_SPACE_VAR: "4"}


def test_no_other_module_sets_its_own_default():
    # Any quoted use of the name: setdefault, environ.get, or a literal in an env dict.
    setters = re.compile(r"""["']VLLM_CPU_KVCACHE_SPACE["']""")
    found = [
        str(p.relative_to(REPO))
        for folder in PACKAGES
        for p in (REPO / folder).rglob("*.py")
        if setters.search(p.read_text()) and p != REPO / "vllm_engine" / "env.py"
    ]
    assert found == []
