"""The reader interface every source kind implements, and the rule all of them share."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Protocol

import pyarrow as pa

from clipbatch.errors import ConfigError
from clipbatch.records import RawSample, ShardSpec
from clipbatch.sources.listing import Listing


class ShardReader(Protocol):
    """Turns a listing into shards, and streams the rows of one shard."""

    kind: str

    def shards_from(self, listing: Listing) -> list[ShardSpec]:
        """All shards of the listing, in a deterministic (sorted) order."""
        ...

    def passthrough_fields(self, shard: ShardSpec) -> list[pa.Field]:
        """Extra columns this shard's rows carry in ``RawSample.extra``, with stable types."""
        ...

    def read(self, shard: ShardSpec, keys: Collection[str] | None = None) -> Iterator[RawSample]:
        """Yield every row of ``shard``; bad rows come with a non-ok status, never silently
        dropped. With ``keys``, only those rows, and no other row's image is fetched (a
        retry of failed rows)."""
        ...


def check_unique_names(shards: list[ShardSpec]) -> None:
    """Two shards with one output name would overwrite each other: refuse the source."""
    names: dict[str, str] = {}
    for s in shards:
        if s.name in names:
            raise ConfigError(
                f"two shards map to the same output name {s.name!r}: {names[s.name]} and {s.uri}; "
                "point the source at one folder of shards"
            )
        names[s.name] = s.uri
