"""Speed and memory benchmarks (run as ``python -m benchmarks.NAME``); results go to ``benchmarks/RESULTS.md``."""
