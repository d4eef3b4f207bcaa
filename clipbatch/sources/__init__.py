"""Dataset readers. Each source kind lists shards and streams :class:`RawSample` rows."""

from clipbatch.sources.base import ShardReader, get_reader, list_shards

__all__ = ["ShardReader", "get_reader", "list_shards"]
