"""Tests of the benchmark tooling (benchmarks/): what decides or records results, not timings."""
