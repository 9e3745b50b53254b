"""Benchmarks: measured ratios against baselines run side by side (see bench/README.md)."""
