"""Thin Prefect tasks over the clipbatch library.

Importing the package applies clipbatch's process settings before torch loads: shard
tasks run in Dask and Ray worker processes too, which import this package first.
"""

from clipbatch.settings import apply_process_settings

apply_process_settings()
