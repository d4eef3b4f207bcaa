"""Which observers a flow run gets (lineage records, OpenLineage, Prefect artifacts/events)."""

from __future__ import annotations

from typing import Any

from clipbatch.config import EmbedConfig
from clipbatch.observe import Observers


def make_observers(config: EmbedConfig, run_meta: dict[str, Any]) -> Observers:
    return Observers([])
