"""Helpers of tests/test_ui.py (the local Studio) and benchmarks/bench_ui.py: small pipeline definitions, a
browser, the UI server as ``python -m pipelines.run ui`` runs it."""
