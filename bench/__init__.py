"""Benchmarks of the edge-runtime pipeline (not part of the installed package)."""
