"""Dataset readers. Each source kind lists shards and streams :class:`RawSample` rows.

- :mod:`~clipbatch.sources.base`: the :class:`ShardReader` interface;
- :mod:`~clipbatch.sources.registry`: :func:`get_reader` and :func:`discover`;
- :mod:`~clipbatch.sources.listing`, :mod:`~clipbatch.sources.detect`: one listing, the kind;
- one module per kind: :mod:`~clipbatch.sources.webdataset`, :mod:`~clipbatch.sources.folder`,
  :mod:`~clipbatch.sources.table`; what they share: :mod:`~clipbatch.sources.fetch`,
  :mod:`~clipbatch.sources.text`, :mod:`~clipbatch.sources.netguard`.
"""
