"""Run outputs: plots, ``report.md`` and multi-run comparison tables."""
