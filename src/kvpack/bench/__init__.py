"""Benchmarks: the harness (inputs, timing, environment, tables), the paper's study (``kvpack bench``),
the paper's logged numbers, the Markdown report and the plots."""
