"""Thin Prefect tasks over the clipbatch library."""
