"""OpenLineage test helpers: a loopback HTTP endpoint and the spec's JSON schemas."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SPEC = Path(__file__).parent / "data" / "openlineage"
# The facet schemas reference the core schema under these versioned ids.
CORE_IDS = [f"https://openlineage.io/spec/1-0-{n}/OpenLineage.json" for n in range(0, 6)] + [
    f"https://openlineage.io/spec/2-0-{n}/OpenLineage.json" for n in range(0, 3)
]
FACETS = {
    "parent": "ParentRunFacet",
    "schema": "SchemaDatasetFacet",
    "outputStatistics": "OutputStatisticsOutputDatasetFacet",
    "columnLineage": "ColumnLineageDatasetFacet",
}


class Collector:
    """An OpenLineage HTTP endpoint on 127.0.0.1 that records what it receives."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.raw: list[bytes] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.raw.append(body)
                outer.headers.append(dict(self.headers))
                outer.events.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _registry() -> Registry:
    core = json.loads((SPEC / "OpenLineage.json").read_text())
    # The core file addresses its parts as #/definitions/..., facet files as #/$defs/...
    core_doc = {**core, "$defs": core["definitions"]}
    resources = [(cid, Resource.from_contents(core_doc)) for cid in CORE_IDS]
    for name in FACETS.values():
        doc = json.loads((SPEC / f"{name}.json").read_text())
        resources.append((doc["$id"], Resource.from_contents(doc)))
    return Registry().with_resources(resources)


_REGISTRY = _registry()
_CORE = Draft202012Validator(json.loads((SPEC / "OpenLineage.json").read_text()))


def _facet_validator(name: str) -> Draft202012Validator:
    doc = json.loads((SPEC / f"{name}.json").read_text())
    return Draft202012Validator({"$ref": f"{doc['$id']}#/$defs/{name}"}, registry=_REGISTRY)


_FACET_VALIDATORS = {key: _facet_validator(name) for key, name in FACETS.items()}


def validate_event(event: dict[str, Any]) -> None:
    """Validate a RunEvent and every facet the spec here defines; raises on mismatch."""
    _CORE.validate(event)
    facet_groups = [event["run"].get("facets") or {}]
    for ds in event.get("inputs", []) + event.get("outputs", []):
        facet_groups.append(ds.get("facets") or {})
        facet_groups.append(ds.get("outputFacets") or {})
    for facets in facet_groups:
        for key, facet in facets.items():
            if key in _FACET_VALIDATORS:
                _FACET_VALIDATORS[key].validate(facet)


@contextlib.contextmanager
def openlineage_env(**env: str) -> Iterator[None]:
    """Set OPENLINEAGE_* variables; restore all of them after (the client adds aliases)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("OPENLINEAGE")}
    os.environ.update(env)
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith("OPENLINEAGE")]:
            del os.environ[k]
        os.environ.update(saved)
