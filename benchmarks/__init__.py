"""Benchmarks that print timings; run as modules: python -m benchmarks.<name>."""
