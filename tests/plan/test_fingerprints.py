"""The fingerprint table of docs/internals.md, row by row: what re-encodes a shard and what does not.

docs/internals.md's "What the fingerprint hashes, and why" is a promise to users about
re-encoding. Every row of both of its tables has cases here (a test fails when a row is
added, removed or reworded without its cases following), and every case flips one input
from a base config and computes :func:`clipbatch.plan.fingerprint.shard_fingerprint` the
way the plan does (the precision in effect from ``effective_precision``, the model's
identity from its resolved checkpoint), asserting it changed or did not, as the row says.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import pytest

from clipbatch.config import EmbedConfig, build_config
from clipbatch.models.base import ResolvedCheckpoint
from clipbatch.plan import fingerprint as fp
from clipbatch.plan.fingerprint import READER_OPTIONS, effective_precision, shard_fingerprint
from clipbatch.records import ShardSpec
from tests.paths import REPO

SECTION = "### What the fingerprint hashes, and why"

BASE_RAW: dict[str, Any] = {
    "source": {"url": "s3://raw/laion/"},
    "sink": {"url": "s3://emb/laion/"},
    "model": {"name": "open_clip:ViT-B-32:laion2b_s34b_b79k"},
    "runtime": {"device": "cpu"},
}
BASE_SHARD = ShardSpec(
    uri="s3://raw/laion/00000.tar",
    name="00000",
    kind="webdataset",
    version="etag:0123abcd",
    members=("s3://raw/laion/a.jpg", "s3://raw/laion/b.jpg"),
    sidecar_uri="s3://raw/laion/00000.parquet",
    row_range=(0, 100),
    sidecar_version="etag:feed",
)
BASE_MODEL = ResolvedCheckpoint(
    load_arg="/cache/open_clip_model.safetensors",
    sha256="ab" * 32,
    display_name="open_clip:ViT-B-32:laion2b_s34b_b79k",
    family="open_clip",
    arch="ViT-B-32",
    tag="laion2b_s34b_b79k",
    revision=None,
    config_sha256="cd" * 32,
    context_length=77,
)


@dataclass(frozen=True)
class Case:
    """One input flipped: config overrides, shard fields, checkpoint fields."""

    what: str
    config: dict[str, Any] = field(default_factory=dict)
    shard: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    schema_version_bump: bool = False


def fingerprint_of(case: Case | None, monkeypatch: pytest.MonkeyPatch | None = None) -> str:
    """The shard's fingerprint as the plan computes it, with ``case``'s input flipped."""
    case = case or Case("base")
    config: EmbedConfig = build_config(BASE_RAW, case.config)
    shard = dataclasses.replace(BASE_SHARD, **case.shard)
    model = dataclasses.replace(BASE_MODEL, **case.model)
    if case.schema_version_bump:
        assert monkeypatch is not None
        monkeypatch.setattr(fp, "SCHEMA_VERSION", fp.SCHEMA_VERSION + 1)
    return shard_fingerprint(
        shard,
        config,
        model.sha256,
        effective_precision(config.runtime, cuda_here=False),
        model.fingerprint_identity(),
        model.context_length,
    )


# The table's row (its first cell, verbatim) -> the cases that flip what it names.
IN = {
    "source shard URI and version (ETag / version id / size+mtime), folder slice members, "
    "table row range, the img2dataset sidecar's URI and version": [
        Case("shard URI", shard={"uri": "s3://raw/laion/00001.tar"}),
        Case("shard version (ETag)", shard={"version": "etag:9999"}),
        Case("shard version (size+mtime)", shard={"version": "size:10:mtime:20"}),
        Case("folder slice members", shard={"members": ("s3://raw/laion/a.jpg",)}),
        Case("table row range", shard={"row_range": (0, 99)}),
        Case("sidecar URI", shard={"sidecar_uri": "s3://raw/laion/other.parquet"}),
        Case("sidecar version", shard={"sidecar_version": "etag:beef"}),
    ],
    "checkpoint sha256; for open_clip and transformers models also family, architecture, "
    "tag or revision and a hash of the config files": [
        Case("checkpoint sha256", model={"sha256": "ef" * 32}),
        Case("family", model={"family": "hf"}),
        Case("architecture", model={"arch": "ViT-B-16"}),
        Case("tag", model={"tag": "openai"}),
        Case("revision", model={"revision": "0123456789abcdef"}),
        Case("config files hash", model={"config_sha256": "00" * 32}),
    ],
    "compute precision in effect (fp16, bf16, fp32)": [
        Case("precision fp32 -> bf16", config={"runtime.precision": "bf16"}),
        Case("precision fp32 -> fp16", config={"runtime.precision": "fp16"}),
        # 'auto' resolves by device: on CUDA it is fp16, so the device changes the vectors.
        Case("auto precision on a CUDA device", config={"runtime.device": "cuda:0"}),
        Case(
            "auto precision with GPU claims on a cluster",
            config={
                "runtime.device": "auto",
                "runtime.task_runner": "ray://head:10001",
                "runtime.gpus_per_shard": 1,
            },
        ),
    ],
    "storage dtype, normalisation, caption token limit in effect, preprocessing mode, pixel "
    "limit, image/caption extensions or columns, caption JSON field, key column, image base "
    "URL, fetch size limit": [
        Case("storage dtype", config={"sink.dtype": "float32"}),
        Case("normalisation", config={"sink.normalize": False}),
        Case("caption token limit below the context", config={"model.max_caption_tokens": 16}),
        Case("preprocessing mode", config={"runtime.preprocess": "fast"}),
        Case("pixel limit", config={"runtime.max_image_pixels": 1_000_000}),
        Case("image extensions", config={"source.image_exts": ["png"]}),
        Case("caption extension", config={"source.caption_ext": "caption"}),
        Case("image column", config={"source.image_column": "url"}),
        Case("caption column", config={"source.caption_column": "text"}),
        Case("caption JSON field", config={"source.caption_json_field": "alt"}),
        Case("key column", config={"source.key_column": "id"}),
        Case("image base URL", config={"source.image_base_url": "https://img.example.com/"}),
        Case("fetch size limit", config={"source.fetch_max_bytes": 1_000_000}),
        # Not named in the table's row, but a reader option like the others: which URLs
        # may be fetched decides rows' statuses (blocked_url).
        Case("allowed networks", config={"source.allow_networks": ["10.20.0.0/16"]}),
    ],
    "schema version": [Case("schema version", schema_version_bump=True)],
}

OUT = {
    "source kind (detected or explicit)": [
        Case("explicit kind", config={"source.kind": "webdataset"}),
        Case("the shard's detected kind", shard={"kind": "folder"}),
    ],
    "fetch concurrency, fetch timeout, fetch retries": [
        Case("fetch concurrency", config={"source.fetch_concurrency": 3}),
        Case("fetch timeout", config={"source.fetch_timeout_s": 1.5}),
        Case("fetch retries", config={"source.fetch_retries": 0}),
    ],
    "task retries and delays, batch size, decode workers, shard concurrency, shards per "
    "task, devices, task runner": [
        Case("task retries", config={"runtime.task_retries": 7}),
        Case("retry delays", config={"runtime.retry_delay_seconds": 30.0}),
        Case("batch size", config={"runtime.batch_size": 2}),
        Case("decode workers", config={"runtime.decode_workers": 1}),
        Case("shard concurrency", config={"runtime.shard_concurrency": 8}),
        Case("shards per task", config={"runtime.shards_per_task": 4}),
        Case("devices", config={"runtime.devices": ["cpu", "cpu"]}),
        Case("task runner (Dask)", config={"runtime.task_runner": "dask://sched:8786"}),
        Case("task runner (Ray)", config={"runtime.task_runner": "ray://head:10001"}),
    ],
    "`max_error_ratio`": [Case("max_error_ratio", config={"runtime.max_error_ratio": 0.1})],
    "`row_group_size`": [Case("row_group_size", config={"sink.row_group_size": 128})],
    "`folder_shard_size`, `table_shard_rows`": [
        Case("folder_shard_size", config={"source.folder_shard_size": 5}),
        Case("table_shard_rows", config={"source.table_shard_rows": 1000}),
    ],
}

# Cases of unchanged fingerprints that look like changes: the value in effect is the same.
SAME_IN_EFFECT = [
    Case(
        "caption limit above the context: clamped to 77", config={"model.max_caption_tokens": 500}
    ),
    Case("caption limit at the context", config={"model.max_caption_tokens": 77}),
    Case(
        "fp32 given explicitly on the CPU, where auto is fp32", config={"runtime.precision": "fp32"}
    ),
]


def readme_rows() -> tuple[list[str], list[str]]:
    """The first cells of the two tables under the fingerprint section of docs/internals.md."""
    text = (REPO / "docs" / "internals.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    tables: list[list[str]] = []
    in_table = False
    for line in section.splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not in_table:  # the header row starts a table
            tables.append([])
            in_table = True
            continue
        if re.fullmatch(r"-+", cells[0].replace(":", "")):
            continue  # the separator row
        tables[-1].append(cells[0])
    assert len(tables) == 2, tables
    return tables[0], tables[1]


def test_every_readme_row_has_cases_and_every_case_a_row() -> None:
    hashed, not_hashed = readme_rows()
    assert sorted(hashed) == sorted(IN)
    assert sorted(not_hashed) == sorted(OUT)
    assert all(IN.values()) and all(OUT.values())
    # Every reader option the fingerprint module names is flipped by some case.
    flipped = {key.split(".", 1)[1] for cases in IN.values() for c in cases for key in c.config}
    assert set(READER_OPTIONS) <= flipped, set(READER_OPTIONS) - flipped


def cases(table: dict[str, list[Case]]) -> list[Any]:
    return [
        pytest.param(row, case, id=f"{row[:40]}::{case.what}")
        for row, row_cases in table.items()
        for case in row_cases
    ]


@pytest.mark.parametrize(("row", "case"), cases(IN))
def test_an_input_in_the_fingerprint_changes_it(
    row: str, case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = fingerprint_of(None)
    assert fingerprint_of(case, monkeypatch) != base, f"docs/internals.md row {row!r}: {case.what}"


@pytest.mark.parametrize(("row", "case"), cases(OUT))
def test_an_input_left_out_of_the_fingerprint_does_not_change_it(row: str, case: Case) -> None:
    config = build_config(BASE_RAW, case.config)
    if case.config:  # the flip took: the config really differs from the base
        assert config != build_config(BASE_RAW), case.what
    assert fingerprint_of(case) == fingerprint_of(None), (
        f"docs/internals.md row {row!r}: {case.what}"
    )


@pytest.mark.parametrize("case", SAME_IN_EFFECT, ids=lambda c: c.what)
def test_the_same_value_in_effect_keeps_the_fingerprint(case: Case) -> None:
    assert fingerprint_of(case) == fingerprint_of(None), case.what


def test_the_base_is_deterministic_and_an_openai_model_has_no_identity() -> None:
    assert fingerprint_of(None) == fingerprint_of(None)
    openai = dataclasses.replace(BASE_MODEL, family="openai")
    assert openai.fingerprint_identity() is None
