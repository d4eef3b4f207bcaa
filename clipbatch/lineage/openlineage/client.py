"""The OpenLineage client: one per transport configuration and process, or none at all."""

from __future__ import annotations

import logging
import os
from typing import Any

from openlineage.client import OpenLineageClient
from openlineage.client.event_v2 import RunEvent

from clipbatch.lineage.transport import transport_configured
from clipbatch.process import process_context

log = logging.getLogger(__name__)


def _config_signature() -> tuple[Any, ...]:
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("OPENLINEAGE")))
    return (env, os.getcwd())


def shared_client() -> OpenLineageClient:
    """One client per transport configuration and process: shard tasks reuse it."""
    process = process_context()
    with process.lock:
        clients = process.lineage_clients
        signature = _config_signature()
        client = clients.get(signature)
        if client is None:
            client = OpenLineageClient()
            # The client aliases OPENLINEAGE_URL into more variables: key it both ways.
            clients[signature] = clients[_config_signature()] = client
        return client


class Emitter:
    """The OpenLineage client, or nothing when no transport is configured."""

    def __init__(self, client: OpenLineageClient | None = None) -> None:
        if client is None and transport_configured():
            try:
                client = shared_client()
            except Exception as e:  # a bad openlineage.yml must not stop embedding
                log.warning("OpenLineage disabled: cannot configure its transport: %s", e)
        self.client = client

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def emit(self, event: RunEvent) -> None:
        if self.client is None:
            return
        try:
            self.client.emit(event)
        except Exception as e:  # lineage must never fail the run it describes
            log.warning(
                "OpenLineage %s event for job %s not delivered: %s",
                event.eventType,
                event.job.name,
                e,
            )
