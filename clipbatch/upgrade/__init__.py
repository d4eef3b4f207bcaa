"""Every upgrade path in one place: what older releases wrote or accepted, still read.

Users' tables are never re-encoded or made unreadable by an upgrade. Each path below
reads what an older release left, says which release wrote it, and after which release
it may be deleted (when no supported table can still hold that form):

| path | module | written by | may go after |
|---|---|---|---|
| ``_manifest.json``, the commit index before ``_commits/`` | :mod:`.manifest_v1` | 0.1.0 up to af75f36 | 0.3 |
| fingerprint formula 1 (every source option, no precision) | :mod:`.fingerprint_v1` | 0.1.0 up to af75f36 | 0.3 |
| crash point ``before_manifest`` (now ``before_index``) | :mod:`.names` | 0.1.0 up to af75f36 | 0.3 |
| run records with ``inputs``/``outputs`` inline (no parts) | :func:`clipbatch.lineage.record.read_run_record` | run records before version 2 | 0.3 |

A new upgrade path gets a module here, a row in this table, and a test on a table the
previous release wrote (tests/data/).
"""
