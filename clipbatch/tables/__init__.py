"""Tables read back: a table's shard files and footers, snapshots of a root, vectors.

Below both :mod:`clipbatch.knn` and :mod:`clipbatch.query`, which read tables the same way.
"""
