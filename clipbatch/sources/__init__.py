"""Dataset readers. Each source kind lists shards and streams :class:`RawSample` rows."""

from clipbatch.sources.base import ShardReader, discover, get_reader

__all__ = ["ShardReader", "discover", "get_reader"]
