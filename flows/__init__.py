"""Prefect flows over the clipbatch library."""
