"""Benchmarks that print figures (not tests): ``python -m bench``."""
