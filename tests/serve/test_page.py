"""``clipbatch serve``'s page in a real browser: Debian's chromium, driven by Playwright.

The server is the real command (``clipbatch serve TABLE``, a subprocess) over a demo
table written by the pipeline, with failed rows. The browser may reach 127.0.0.1 only:
every other request is aborted, and the test fails if one was attempted. What the page
shows is checked against the API and the source: the hits of a query (k of them, in the
API's order), the pixels of a thumbnail as the browser decoded it against the source
image in the tar, a row's detail panel, "more like this", the overview's status counts,
an uploaded image as the query, and an API error shown on the page (never an alert).

``CLIPBATCH_PAGE_SCREENSHOTS=docs/images`` also writes the README's screenshots there.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from tests.conftest import free_port
from tests.serve.tables import embed, tiny_config, webdataset_with_failures

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parents[2]
K = 12
QUERY = "a red circle"
# No proxy from the environment: the server is on loopback.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str, timeout: float = 5) -> bytes:
    with HTTP.open(url, timeout=timeout) as response:
        return response.read()


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with HTTP.open(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``clipbatch serve`` over a demo table (2 shards x 24 images of 64 px, 2 failed rows),
    laid out as ``clipbatch demo`` lays it out, and served by its relative path."""
    root = tmp_path_factory.mktemp("page")
    wds = root / "clipbatch-demo" / "data"
    webdataset_with_failures(wds, shards=2, per_shard=24)
    embed(tiny_config(str(wds), str(root / "clipbatch-demo" / "embeddings")))
    judge(root / "clipbatch-demo" / "embeddings", root / "heads")
    port = free_port()
    pythonpath = os.environ.get("PYTHONPATH", "")
    base = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "clipbatch_flows.cli.main", "serve"]
            + ["clipbatch-demo/embeddings", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), pythonpath])),
            },
        )
        try:
            deadline = time.monotonic() + 180
            while True:
                if server.poll() is not None:
                    pytest.fail(f"clipbatch serve exited: {log_path.read_text()[-3000:]}")
                try:
                    if json.loads(get(base + "/health", timeout=2)) == {"status": "ok"}:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"clipbatch serve did not answer: {log_path.read_text()[-3000:]}")
                time.sleep(0.1)  # the poll's interval
            yield base, wds
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def judge(table: Path, heads: Path) -> None:
    """A user's head ("quality") and SemDeDup over the table, as ``clipbatch score`` does,
    and a curation ("train") as ``clipbatch curate`` does."""
    import torch
    from safetensors.torch import save_file

    from clipbatch.heads.base import mlp
    from clipbatch.heads.registry import load_head
    from clipbatch.judge.score import score_root
    from clipbatch.judge.semdedup import semdedup_root

    heads.mkdir()
    torch.manual_seed(4)
    save_file(mlp([64, 1]).state_dict(), str(heads / "quality.safetensors"))
    config = {"name": "quality", "embed_dim": 64, "layers": [64, 1], "output": "sigmoid"}
    (heads / "quality.json").write_text(json.dumps(config))
    score_root(str(table), [load_head(str(heads / "quality.json"))])
    semdedup_root(str(table))
    from clipbatch.curate.run import curate_root

    spec = {"name": "train", "rules": {"min_similarity": None, "unique": 0.05},
            "output": {"url": str(heads.parent / "curated")}}  # fmt: skip
    curate_root(str(table), spec)


def source_jpeg(wds: Path, key: str) -> bytes:
    for tar_path in sorted(wds.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name == f"{key}.jpg":
                    return tar.extractfile(member).read()
    raise KeyError(key)


def save_screenshot(png: bytes, name: str) -> None:
    """Into $CLIPBATCH_PAGE_SCREENSHOTS, as a small palette PNG (when it is set)."""
    folder = os.environ.get("CLIPBATCH_PAGE_SCREENSHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, kmeans=3)
    image.save(Path(folder) / name, optimize=True)


def grid_keys(page) -> list[str]:  # type: ignore[no-untyped-def]
    return page.eval_on_selector_all("#grid .hit", "els => els.map(e => e.dataset.key)")


def test_the_page_searches_shows_rows_and_stays_on_loopback(
    served: tuple[str, Path], tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is absent: `apt-get install chromium` (Debian's) to run the page's test"
        )
    from playwright.sync_api import sync_playwright

    base, wds = served
    api_hits = post_json(base + "/api/search", {"text": QUERY, "k": K})["hits"]
    blocked: list[str] = []
    allowed: list[str] = []
    errors: list[str] = []
    dialogs: list[str] = []

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()

            def guard(route) -> None:  # type: ignore[no-untyped-def]
                if urlsplit(route.request.url).hostname == "127.0.0.1":
                    allowed.append(route.request.url)
                    route.continue_()
                else:
                    blocked.append(route.request.url)
                    route.abort()

            page.route("**/*", guard)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(base + "/")

            # The header and the overview.
            page.wait_for_selector("#info-chips .chip")
            header = page.inner_text("header")
            assert "clipbatch-demo/embeddings" in header and "brute force" in header
            assert "tiny" in header and "fp32" in header and "exact" in header
            page.wait_for_selector('#by-status li[data-status="missing_image"]')
            counts = {
                li.get_attribute("data-status"): li.inner_text()
                for li in page.query_selector_all("#by-status li")
            }
            assert counts.keys() == {"ok", "missing_image", "decode_error"}
            assert counts["ok"].split()[-1] == "48" and counts["missing_image"].split()[-1] == "1"
            assert "not an image" in page.inner_text("#failed")
            assert page.query_selector("#histogram svg rect.bar") is not None
            page.wait_for_selector("#dups p")
            assert "clipbatch dedup" in page.inner_text("#dups")

            # A text query: k thumbnails, in the API's order.
            page.fill("#k", str(K))
            page.fill("#q", QUERY)
            page.press("#q", "Enter")
            page.wait_for_selector("#grid .hit img.thumb")
            assert grid_keys(page) == [h["key"] for h in api_hits]
            assert page.locator("#grid img.thumb").count() == K
            assert QUERY in page.inner_text("#query-label")
            method = page.inner_text("#method")
            assert "brute force over 50 rows" in method and "filter: none" in method
            assert "encode" in method and "ms" in method
            page.wait_for_function(
                "[...document.querySelectorAll('#grid img.thumb')]"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )

            # The first thumbnail, as the browser decoded it, is the source image.
            first = api_hits[0]
            img = page.query_selector("#grid .hit img.thumb")
            assert img.get_attribute("src") == first["thumbnail"] + "?size=256"
            shown = img.evaluate(
                """img => {
                    const c = document.createElement("canvas");
                    c.width = img.naturalWidth; c.height = img.naturalHeight;
                    const g = c.getContext("2d");
                    g.drawImage(img, 0, 0);
                    return {w: c.width, h: c.height,
                            rgba: Array.from(g.getImageData(0, 0, c.width, c.height).data)};
                }"""
            )
            source = Image.open(io.BytesIO(source_jpeg(wds, first["key"]))).convert("RGB")
            source.thumbnail((256, 256), Image.Resampling.LANCZOS)
            assert (shown["w"], shown["h"]) == source.size
            pixels = np.array(shown["rgba"], np.uint8).reshape(shown["h"], shown["w"], 4)[..., :3]
            diff = np.abs(pixels.astype(np.float32) - np.asarray(source, np.float32)).mean()
            assert diff < 8, f"the thumbnail differs from the source by {diff:.1f}/255 on average"
            save_screenshot(page.screenshot(full_page=True), "serve-search.png")

            # The detail panel of the first result.
            page.click("#grid .hit >> nth=0")
            page.wait_for_selector('#detail [data-field="status"]')
            assert page.inner_text("#detail-title") == first["key"]
            assert page.inner_text('#detail [data-field="status"]') == "ok"
            assert page.inner_text('#detail [data-field="key"]') == first["key"]
            assert page.inner_text('#detail [data-field="source_member"]') == first["key"]
            assert page.inner_text('#detail [data-field="source_uri"]').endswith(".tar")
            assert page.inner_text('#detail [data-field="run_id"]') == "test-run"
            assert page.inner_text('#detail [data-field="caption"]') == first["caption"]
            page.wait_for_function(
                "(() => { const i = document.querySelector('#detail .detail-image img');"
                " return i && i.complete && i.naturalWidth === 64; })()"
            )
            quality = page.inner_text('#detail [data-field="score:quality"]')
            assert float(quality) == pytest.approx(first["scores"]["quality"], abs=1e-4)
            assert "first of its duplicate group" in page.inner_text(
                '#detail [data-field="group:semdedup-0.05"]'
            )
            save_screenshot(page.screenshot(), "serve-detail.png")

            # More like this: its neighbours in the grid, without the row itself.
            like = post_json(base + "/api/search", {"key": first["key"], "k": K})["hits"]
            page.click("#more-like-this")
            page.wait_for_function(
                "key => document.querySelector('#query-label').textContent.includes('more like')"
                " && ![...document.querySelectorAll('#grid .hit')].some(e => e.dataset.key === key)",
                arg=first["key"],
            )
            assert page.is_hidden("#detail")
            keys = grid_keys(page)
            assert len(keys) == K and first["key"] not in keys
            assert keys == [h["key"] for h in like]

            # A score filter: only rows scored at least the median, as the API answers.
            median = float(np.median([h["scores"]["quality"] for h in api_hits]))
            filtered = post_json(
                base + "/api/search",
                {
                    "text": QUERY,
                    "k": K,
                    "scores": [f"quality>={median}"],
                    "unique": "semdedup-0.05",
                },
            )["hits"]
            assert page.is_visible("#score-wrap") and page.is_visible("#unique-wrap")
            page.fill("#score-filter", f"quality>={median}")
            page.check("#unique")
            page.fill("#q", QUERY)
            page.press("#q", "Enter")
            # (Changing a filter reruns the last search first: wait for this query's grid.)
            page.wait_for_function(
                "keys => JSON.stringify([...document.querySelectorAll('#grid .hit')]"
                ".map(e => e.dataset.key)) === JSON.stringify(keys)"
                " && document.querySelector('#query-label').textContent.includes('red circle')",
                arg=[h["key"] for h in filtered],
            )
            assert "applied to every row" in page.inner_text("#method")
            assert all(h["scores"]["quality"] >= median for h in filtered)
            page.click("#clear-filters")

            # A failed row from the overview: its status and error, no image.
            page.click('#failed button[data-key="zz-no-image"]')
            page.wait_for_selector('#detail [data-field="status"]')
            assert page.inner_text('#detail [data-field="status"]') == "missing_image"
            assert "no image member" in page.inner_text('#detail [data-field="error"]')
            why = page.inner_text('#detail [data-field="curation:train"]')
            assert "dropped" in why and "status: missing_image" in why
            save_screenshot(page.screenshot(), "serve-dropped.png")
            assert page.query_selector("#detail .detail-image .placeholder") is not None
            page.keyboard.press("Escape")
            assert page.is_hidden("#detail")

            # An API error is shown on the page.
            page.fill("#q", "   ")
            page.press("#q", "Enter")
            page.wait_for_selector("#search-error:not([hidden])")
            assert "the text is empty" in page.inner_text("#search-error")

            # An image as the query (the file picker): the row itself comes first.
            page.set_input_files(
                "#file",
                files=[
                    {
                        "name": "query.jpg",
                        "mimeType": "image/jpeg",
                        "buffer": source_jpeg(wds, first["key"]),
                    }
                ],
            )
            page.wait_for_function(
                "document.querySelector('#query-label').textContent.includes('query.jpg')"
            )
            assert page.is_hidden("#search-error")
            assert grid_keys(page)[0] == first["key"]
        finally:
            context.close()

    assert blocked == [], f"the page tried to reach other hosts: {blocked}"
    assert any("/api/thumbnail/" in url for url in allowed)  # the guard saw the page's requests
    assert errors == [], f"the page raised: {errors}"
    assert dialogs == [], f"the page opened dialogs: {dialogs}"
