"""Benchmarks: `make bench-*` runs them; results go to bench/results/ and BENCHMARKS.md
(bench/common.py: the result header, the writer and the teacher data they share)."""
