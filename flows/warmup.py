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


def warm_start(config: EmbedConfig) -> None:
    """Start the temporary server (when one will be needed) while the model loads."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    errors: list[BaseException] = []
    thread = None
    if not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        thread = threading.Thread(
            target=_start_temporary_server, args=(errors,), name="prefect-server", daemon=True
        )
        thread.start()
    try:
        if not config.runtime.devices:  # device workers load their own copies
            from clipbatch.model import load_model

            load_model(config.model, config.runtime.device, config.runtime.precision)
    except Exception as e:  # noqa: BLE001 - the flow loads it again and reports the error
        log.debug("model preload failed; the flow will report it: %s", e)
    finally:
        if thread is not None:
            thread.join()  # the flow must not race a half-started server
    if errors:
        log.warning("early start of Prefect's temporary server failed: %s", errors[0])
