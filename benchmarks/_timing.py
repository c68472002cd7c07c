"""Kept for scripts that import ``_timing``: the benchmark helper lives in ``fxeff.bench`` (import it from there)."""
from fxeff.bench import environment, interleaved, markdown_table, measure, report  # noqa: F401
