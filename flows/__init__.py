"""Prefect flows over the clipbatch library.

Importing the package applies clipbatch's process settings before torch loads, so a
flow run, however it was started (the CLI, a worker, a deployment), gets them.
"""

from clipbatch.settings import apply_process_settings

apply_process_settings()
