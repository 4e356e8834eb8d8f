"""Benchmarks: `make bench-*` runs them; results go to bench/results/ and BENCHMARKS.md."""
