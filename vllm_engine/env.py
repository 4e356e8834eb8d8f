"""The one place that defaults vLLM's CPU KV-cache size, for every phase that starts vLLM.

vLLM's CPU build reserves VLLM_CPU_KVCACHE_SPACE GiB for the KV cache, and 92% of the
node's memory when it is unset, which a shared machine refuses. Precompute, the on-policy
trainer, evaluation, benchmarks and tests all start engines, and precompute and train may
not import each other, so the default lives in shards/, the kernel both phases share.
A value the user set always wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

KVCACHE_SPACE_VAR = "VLLM_CPU_KVCACHE_SPACE"
KVCACHE_SPACE_GIB = "1"


def default_kvcache_space(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Set the KV-cache default in `env` (this process's environment when None) unless it is
    already set; returns `env`. Call it before vLLM is imported: it reads the variable then."""
    env = os.environ if env is None else env
    env.setdefault(KVCACHE_SPACE_VAR, KVCACHE_SPACE_GIB)
    return env
