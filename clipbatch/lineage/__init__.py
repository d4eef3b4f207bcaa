"""Run-level lineage (docs/design.md §6): run records, OpenLineage events, staleness checks.

Plain Python, no Prefect imports: the flow layer (flows/observers.py) wires these
observers into a run, and the CLI (``clipbatch lineage``) reads what they wrote.
"""
