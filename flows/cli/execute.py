"""Run the Prefect flow from the CLI, with a progress bar, and print its summary."""

from __future__ import annotations

from typing import Any

from clipbatch.config import EmbedConfig


def execute(
    config: EmbedConfig, progress: bool = False, verbose: bool = False
) -> tuple[dict[str, Any], str | None]:
    """Run ``embed_dataset`` in this process. Returns (summary, error message or None)."""
    from clipbatch_flows.warmup import WarmStart

    warm = WarmStart(config, verbose)  # Prefect's temporary server boots while we import and load
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
