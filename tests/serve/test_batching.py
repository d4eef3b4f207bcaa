"""The dynamic batcher: shared passes, early ends to a wait, results into asyncio."""

from __future__ import annotations

import asyncio
import threading

import pytest

from clipbatch.serve.batching import DynamicBatcher


def test_a_wait_ends_once_requests_stop_coming() -> None:
    """A lone request is answered long before ``max_wait_s``: nothing came for
    ``quiet_s``. (Without the quiet gap it would wait the whole 60 s.)"""
    batcher = DynamicBatcher(lambda xs: [x * 2 for x in xs], max_wait_s=60, quiet_s=0.01)
    try:
        assert batcher.submit([1, 2]).result(timeout=20) == [2, 4]
    finally:
        batcher.close()


def test_async_requests_share_passes_and_each_gets_its_own_results() -> None:
    gate = threading.Event()

    def forward(items: list[int]) -> list[int]:
        gate.wait(10)  # the first pass holds the others back: they queue up together
        return [x + 100 for x in items]

    batcher = DynamicBatcher(forward, max_items=64, max_wait_s=0.05)

    async def main() -> list[list[int]]:
        calls = [batcher.submit_async([i, -i]) for i in range(20)]
        await asyncio.sleep(0)
        gate.set()
        return list(await asyncio.gather(*calls))

    try:
        got = asyncio.run(main())
    finally:
        batcher.close()
    assert got == [[i + 100, -i + 100] for i in range(20)]
    assert batcher.stats.requests == 20 and batcher.stats.passes < 20


def test_an_error_in_a_pass_reaches_every_request_in_it() -> None:
    def forward(items: list[str]) -> list[str]:
        raise ValueError("the model failed")

    batcher = DynamicBatcher(forward, max_wait_s=0.01)

    async def main() -> list[BaseException | list[str]]:
        calls = [batcher.submit_async(["x"]) for _ in range(3)]
        return list(await asyncio.gather(*calls, return_exceptions=True))

    try:
        got = asyncio.run(main())
        with pytest.raises(ValueError, match="the model failed"):
            batcher.submit(["y"]).result(timeout=20)
    finally:
        batcher.close()
    assert all(isinstance(e, ValueError) and "the model failed" in str(e) for e in got)
    assert asyncio.run(_empty(batcher)) == []


async def _empty(batcher: DynamicBatcher) -> list:
    return await batcher.submit_async([])
