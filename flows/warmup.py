"""Overlap Prefect's temporary-server start-up with loading the model (CLI runs).

Without ``PREFECT_API_URL``, Prefect starts a temporary server in a subprocess on the
first API call, and waits for it: about 10-15 s on 2 cores, spent in that subprocess.
Starting it in the background first lets this process import torch and load the model
meanwhile (the model is cached per process, so the shard task reuses it). Prefect then
finds the same server instance (a per-process singleton) already running.
"""

from __future__ import annotations

import logging
import threading

from clipbatch.config import EmbedConfig

log = logging.getLogger(__name__)


def _start_temporary_server(errors: list[BaseException]) -> None:
    try:
        from prefect.server.api.server import SubprocessASGIServer

        SubprocessASGIServer().start()
    except BaseException as e:  # noqa: BLE001 - Prefect retries the start and reports it
        errors.append(e)


class WarmStart:
    """Started first thing in a CLI run; :meth:`finish` before the flow starts."""

    def __init__(self, config: EmbedConfig) -> None:
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

        self.config = config
        self.errors: list[BaseException] = []
        self.thread: threading.Thread | None = None
        if not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            self.thread = threading.Thread(
                target=_start_temporary_server,
                args=(self.errors,),
                name="prefect-server",
                daemon=True,
            )
            self.thread.start()

    def finish(self) -> None:
        """Load the model (cached per process) while the server boots; then wait for it."""
        try:
            if not self.config.runtime.devices:  # device workers load their own copies
                from clipbatch.model import load_model

                runtime = self.config.runtime
                load_model(self.config.model, runtime.device, runtime.precision)
        except Exception as e:  # noqa: BLE001 - the flow loads it again and reports the error
            log.debug("model preload failed; the flow will report it: %s", e)
        finally:
            if self.thread is not None:
                self.thread.join()  # the flow must not race a half-started server
        if self.errors:
            log.warning("early start of Prefect's temporary server failed: %s", self.errors[0])


def warm_start(config: EmbedConfig) -> None:
    """Start the temporary server (when one will be needed) while the model loads."""
    WarmStart(config).finish()
