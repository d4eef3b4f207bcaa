"""Run the Prefect flow from the CLI, with a progress bar, and print its summary.

**A clean stop.** SIGTERM (Kubernetes eviction, spot reclaim, ``kill``) or SIGINT stops
the run: the flow records what was committed (commit index, run record marked
``cancelled``), then this process stops every child it started (Prefect's temporary
server, per-device workers) and exits (143 or 130) without waiting for the shard in
flight, whose staged file the next run removes. Before, SIGTERM left the temporary
server running, reparented to init.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

from clipbatch.config import EmbedConfig
from clipbatch.errors import RunStopped


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises :class:`RunStopped` in the main thread. Prefect's own handler, which
    it installs around a flow run, hands the signal on to this one when its run has
    recorded the crash, so the stop still reaches us (and no child is left behind).

    SIGINT raises KeyboardInterrupt, as Python's own handler does, but from a handler of
    ours: ``asyncio.run`` replaces Python's (and only Python's) with one that cancels its
    task instead, and a task that swallows the cancellation ends normally, so a SIGINT
    that came while the main thread ran an event loop was lost and the run went on to
    exit 0. A SIGINT ignored (a background job's) stays ignored."""

    def stop(signum: int, frame: object) -> None:
        raise RunStopped(signal.Signals(signum).name)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def execute(
    config: EmbedConfig, progress: bool = False, verbose: bool = False
) -> tuple[dict[str, Any], str | None]:
    """Run ``embed_dataset`` in this process. Returns (summary, error message or None)."""
    with stop_on_sigterm():
        return _execute(config, progress, verbose)


def _execute(
    config: EmbedConfig, progress: bool, verbose: bool
) -> tuple[dict[str, Any], str | None]:
    from clipbatch_flows.warmup import WarmStart

    warm = WarmStart(config, verbose)  # Prefect's temporary server boots while we import and load
    try:
        return _run_flow(config, progress, warm)
    except (RunStopped, KeyboardInterrupt):
        warm.close()  # the temporary server, now: the process exits without waiting
        from clipbatch.pipeline.devices import close_device_pools

        close_device_pools()
        raise


def _run_flow(config: EmbedConfig, progress: bool, warm: Any) -> tuple[dict[str, Any], str | None]:
    from clipbatch_flows.embed import embed_dataset

    from clipbatch.pipeline.summary import RunFailedError
    from clipbatch.process import process_context

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="img", desc="embedding", dynamic_ncols=True)
        process_context().progress = bar.update
    try:
        with warm.session():
            state = embed_dataset(config, return_state=True)
    finally:
        process_context().progress = None
        if bar is not None:
            bar.close()
    result = state.result(raise_on_failure=False)
    if isinstance(result, RunFailedError):
        return result.summary.to_dict(), str(result)
    if isinstance(result, BaseException):
        from clipbatch.errors import ClipbatchError

        if isinstance(result, ClipbatchError):
            raise result
        return {"dest": config.sink.url}, f"{type(result).__name__}: {result}"
    return result, None


def print_summary(summary: dict[str, Any]) -> None:
    if "shards" not in summary:
        return
    t = summary["timings"]
    print(f"table:      {summary['dest']}")
    print(
        f"shards:     {summary['shards']} ({summary['shards_committed']} written, "
        f"{summary['shards_skipped']} already done, {summary['shards_failed']} failed)"
    )
    print(
        f"rows:       {summary['rows_written']} written: {summary['rows_ok']} ok, {summary['rows_failed']} failed"
    )
    if summary["status_counts"]:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(summary["status_counts"].items()))
        print(f"statuses:   {counts}")
    print(f"speed:      {summary['images_per_second']:.1f} images/s over {summary['seconds']:.1f}s")
    print(
        f"stages:     read {t['read']:.2f}s, decode {t['decode']:.2f}s, "
        f"encode {t['encode']:.2f}s, write {t['write']:.2f}s (summed over threads)"
    )
