"""Benchmarks and their shared timing helpers; run from the repository root (docs/performance.md)."""
