"""All devices of one node without Spark: one worker process per device, shards spread across them.

Each worker process is told its device explicitly (``cuda:0``, ``cuda:1``, ...) and
runs shards with ``runtime.device`` set to it, so no two workers share a GPU and none
defaults to ``cuda:0`` (clip-retrieval#292). The model loads once per worker.

The Prefect layer stays as it is: the flow still maps one task run per shard, and each
task thread hands its shard to whichever worker is free (:func:`run_shard_on_devices`).
With ``shard_concurrency`` at least the number of devices, every device stays busy.
Commit, manifest and fingerprints work unchanged, because a worker runs the same
:func:`clipbatch.pipeline.worker.run_shard` a single process would.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import queue
from collections.abc import Callable, Sequence
from typing import Any

from clipbatch.config import EmbedConfig
from clipbatch.errors import ConfigError, TransientIOError
from clipbatch.process import process_context
from clipbatch.records import ShardResult, ShardSpec

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.5


class WorkerLostError(TransientIOError):
    """A device worker process died mid-shard (the message says 'worker lost': retried)."""


def resolve_devices(devices: Sequence[str]) -> list[str]:
    """Expand ``['all']`` to every visible CUDA device; check explicit names."""
    import torch

    names = list(devices)
    if names == ["all"]:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError("runtime.devices=['all'] asks for every GPU, but CUDA sees none")
        return [f"cuda:{i}" for i in range(count)]
    for name in names:
        if name == "all":
            raise ConfigError("'all' must be the only entry of runtime.devices")
        if name.startswith("cuda"):
            index = int(name.split(":", 1)[1]) if ":" in name else 0
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                raise ConfigError(f"device {name!r} is not present on this machine")
        elif name != "cpu":
            raise ConfigError(f"unknown device {name!r}; use 'cuda:N', 'cpu' or 'all'")
    return names


def device_slots(devices: Sequence[str]) -> int:
    """How many device workers ``runtime.devices`` starts (0 when unset)."""
    return len(resolve_devices(devices)) if devices else 0


def _worker_main(device: str, target: Callable[..., Any], inbox: Any, outbox: Any) -> None:
    """One process, one device: run jobs until told to stop (None)."""
    from clipbatch.settings import apply_process_settings

    apply_process_settings()  # a fresh interpreter: before torch loads
    os.environ["CLIPBATCH_WORKER_DEVICE"] = device
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(device)  # stray allocations land on this GPU, not cuda:0
    from clipbatch.process import process_context

    # Rows done go back to the parent as they are written, so its progress bar moves.
    process_context().progress = lambda rows: outbox.put(("progress", rows))
    while True:
        job = inbox.get()
        if job is None:
            return
        try:
            outbox.put(("ok", target(device, *job)))
        except BaseException as e:  # noqa: BLE001 - sent back to the calling thread
            try:
                outbox.put(("error", e))
            except Exception:  # noqa: BLE001 - an exception that does not pickle
                outbox.put(("error", RuntimeError(f"{type(e).__name__}: {e}")))


class DevicePool:
    """One spawned worker process per device; :meth:`run` sends a job to a free worker.

    Thread-safe: several task threads may call :meth:`run` at once; each blocks until a
    worker is free and its job is done. A worker that dies raises :class:`WorkerLostError`
    in the calling thread and is replaced.
    """

    def __init__(self, devices: Sequence[str], target: Callable[..., Any]) -> None:
        if not devices:
            raise ConfigError("a device pool needs at least one device")
        self.devices = list(devices)
        self._target = target
        self._ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        self._workers: list[tuple[Any, Any, Any]] = [self._start(d) for d in self.devices]
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(len(self.devices)):
            self._free.put(i)
        self._closed = False

    def _start(self, device: str) -> tuple[Any, Any, Any]:
        inbox, outbox = self._ctx.Queue(), self._ctx.Queue()
        proc = self._ctx.Process(
            target=_worker_main,
            args=(device, self._target, inbox, outbox),
            name=f"clipbatch-{device}",
            daemon=True,
        )
        proc.start()
        return proc, inbox, outbox

    def run(self, *job: Any) -> Any:
        """Run ``target(device, *job)`` on a free worker; returns its result or raises its error."""
        if self._closed:
            raise RuntimeError("device pool is closed")
        index = self._free.get()
        try:
            proc, inbox, outbox = self._workers[index]
            inbox.put(job)
            while True:
                try:
                    kind, value = outbox.get(timeout=_POLL_SECONDS)
                    if kind != "progress":
                        break
                    listener = process_context().progress
                    if listener is not None:
                        listener(value)
                except queue.Empty:
                    if not proc.is_alive():
                        device = self.devices[index]
                        self._workers[index] = self._start(device)
                        raise WorkerLostError(
                            f"worker lost: the process for {device} exited with code "
                            f"{proc.exitcode} mid-job"
                        ) from None
        finally:
            self._free.put(index)
        if kind == "error":
            raise value
        return value

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc, inbox, _ in self._workers:
            if proc.is_alive():
                inbox.put(None)
        for proc, _, _ in self._workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()


def _run_shard_on(
    device: str,
    shard: ShardSpec,
    config: EmbedConfig,
    run_id: str,
    fingerprint: str,
    run_meta: dict[str, Any],
    credentials: dict[str, Any] | None = None,
    retry: bool = False,
) -> ShardResult:
    from clipbatch.io.credentials import install
    from clipbatch.pipeline.worker import run_shard

    install(credentials or {})
    runtime = config.runtime.model_copy(update={"device": device, "devices": ()})
    return run_shard(shard, config.model_copy(update={"runtime": runtime}), run_id, fingerprint, {
        **run_meta, "device": device, "worker_pid": os.getpid(),
    }, retry)  # fmt: skip


def device_pool(devices: Sequence[str]) -> DevicePool:
    """This process's pool for ``devices`` (started on first use, closed at exit)."""
    resolved = tuple(resolve_devices(devices))
    process = process_context()
    with process.lock:
        pool = process.device_pools.get(resolved)
        if pool is None or pool.closed:
            atexit.unregister(close_device_pools)  # once, however many pools: close them at exit
            atexit.register(close_device_pools)
            pool = process.device_pools[resolved] = DevicePool(resolved, _run_shard_on)
            log.info("started %d device worker(s): %s", len(resolved), ", ".join(resolved))
        return pool


def run_shard_on_devices(
    shard: ShardSpec,
    config: EmbedConfig,
    run_id: str,
    fingerprint: str,
    run_meta: dict[str, Any] | None = None,
    retry: bool = False,
) -> ShardResult:
    """Encode one shard (``retry``: its failed rows again) on a free device worker
    (``runtime.devices``), or here when none is set."""
    if not config.runtime.devices:
        from clipbatch.pipeline.worker import run_shard

        return run_shard(shard, config, run_id, fingerprint, run_meta, retry)
    from clipbatch.io.credentials import registered

    pool = device_pool(config.runtime.devices)
    # Credentials loaded from a Prefect block travel to the worker process in memory.
    meta = dict(run_meta or {})
    return pool.run(shard, config, run_id, fingerprint, meta, registered(), retry)


def close_device_pools() -> None:
    """Stop every device worker process of this process (at exit, or a stopped run)."""
    process = process_context()
    with process.lock:
        for pool in process.device_pools.values():
            pool.close()
        process.device_pools.clear()
