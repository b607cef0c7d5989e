"""Benchmarks, measured side by side in one process; each module runs as `python -m`."""
