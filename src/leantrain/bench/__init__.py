"""Benchmarks: each area compares its methods with their anchors in one run and writes bench-results/<area>.json.

See ``shared/BENCHMARKS.md`` for the JSON shape and the measurement rules (interleaved repeats, medians,
fresh processes for peak memory, several seeds for accuracy).
"""
