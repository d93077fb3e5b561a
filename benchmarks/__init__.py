"""Reproducible speed and memory measurements; run ``python -m benchmarks.run --help``."""
