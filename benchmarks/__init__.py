"""Benchmarks: ratios measured side by side in one run (``w2v-dist bench ...``), one JSON line per
measurement."""
