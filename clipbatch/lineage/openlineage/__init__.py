"""OpenLineage run events for embedding runs and their shard tasks (docs/design.md §6).

OSS Prefect has no OpenLineage integration, so a run reports itself: START when it
is planned, COMPLETE or FAIL at the end, with the source dataset as input and the
embedding table as output (schema, output statistics and column lineage facets).
Each shard task reports its own run, with a parent facet pointing at the flow run,
and the flow run points at its parent (a backfill) the same way.

The transport is the client's, configured the standard way: ``OPENLINEAGE_URL``
(+ ``OPENLINEAGE_API_KEY``), ``OPENLINEAGE_CONFIG`` or an ``openlineage.yml``
(console, file, HTTP, ...), or ``OPENLINEAGE__TRANSPORT__*`` variables. With none of
those, nothing is emitted (the client alone would fall back to printing to stdout).
Emission failures are logged and never fail a run.

Modules: :mod:`.facets` (names, ids and facets), :mod:`.client` (the transport, one
client per process), :mod:`.observer` (the flow run's events), :mod:`.shard` (a shard
task's events).
"""
