"""``{dest}/_commits/``: the commit index, whose cost per commit does not grow with the table.

Shard files are the truth; the index lets a run plan 230,000 shards with one listing of
``dest`` and a handful of reads, instead of a footer read per shard (docs/design.md §2).

**Records.** One record per committed shard file: shard name, fingerprint, rows, counts,
sha256, source URI and version, run id, and the file's own version as the store lists
it (``file_version``: the ETag on object stores, size+mtime on local disk). A record
describes exactly one file: it is trusted only while the listed file still has that
version. So a file rewritten by a crashed or concurrent run can never be mistaken for
the one a stale record describes, whatever the interleaving.

**Segments.** Records live in immutable Parquet segments under ``_commits/``; nothing is
ever read-modified-written, so concurrent writers never race:

- a run collects its commits in memory and writes ``part-{run}-{seq}.parquet`` every
  ``FLUSH_RECORDS`` commits or ``FLUSH_SECONDS`` (a crash loses at most that window,
  which the next plan adopts from the files' own footers);
- at the end of the run its parts are merged into one ``run-{run}.parquet``;
- when more than ``MAX_SEGMENTS`` segments exist (or a legacy ``_manifest.json`` is still
  there), the run compacts them into one ``snapshot-….parquet``, keeping the records that
  still match the listed files, and deletes what it merged. Two runs compacting at once
  only produce two snapshots holding the same records; duplicates are harmless.

Every segment is written whole in one PUT (or an atomic rename locally), so a reader
never sees half a segment. Names start with ``_``, which table readers skip.

**Upgrade.** Tables written before the index have ``_manifest.json``
(:mod:`clipbatch.upgrade.manifest_v1`). It is read (once per plan) for shards that have
no record in a segment, and folded into the first snapshot, after which it is deleted.

**Modules.** :mod:`.segments` (records and segment files), :mod:`.index` (what a plan
reads), :mod:`.writer` (a run's commits), :mod:`.compact` (merging segments).
"""
