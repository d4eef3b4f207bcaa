"""Benchmarks that print figures (not tests): ``python -m bench``."""

from clipbatch.settings import apply_process_settings

apply_process_settings()
