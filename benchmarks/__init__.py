"""The benchmark suite: C{python -m benchmarks.run} (what C{make bench} runs)."""
