"""Per-item seeds derived from one run seed and the item's identity, so a draw does not depend
on batching, worker split or resume (precompute's samples, an episode's step)."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *key) -> int:
    """A 31-bit seed from (seed, key...), independent of batching and worker split."""
    blob = ":".join(map(str, (seed, *key))).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little") & 0x7FFFFFFF
