"""Benchmarks: `make bench-*` runs them; results go to bench/results/ and BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def checkout_relative(value, root: Path = CHECKOUT):
    """`value` (a result: dicts, lists, strings) with the checkout's absolute folder removed
    from every string, so a result file names `models/x` and `.venv/bin/python`, not the
    folders of the machine that made it."""
    prefix = f"{root}/"
    if isinstance(value, str):
        return value.replace(prefix, "")
    if isinstance(value, dict):
        return {k: checkout_relative(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [checkout_relative(v, root) for v in value]
    return value
