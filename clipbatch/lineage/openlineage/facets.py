"""Job names, run ids and the facets clipbatch's OpenLineage events carry."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import attr
import pyarrow as pa
from openlineage.client.facet_v2 import RunFacet, column_lineage_dataset, schema_dataset

from clipbatch.config import SourceConfig
from clipbatch.io.storage import get_fs, read_parquet_metadata

log = logging.getLogger(__name__)

PRODUCER = "https://pypi.org/project/clipbatch/"
SHARD_JOB_SUFFIX = "encode-shard"
CUSTOM_FACET_SCHEMA = "https://pypi.org/project/clipbatch/#/definitions/ClipbatchRunFacet"


def flow_job_name(run_meta: Mapping[str, Any]) -> str:
    """Stable across runs: the deployment (flow/deployment) when deployed, else the flow."""
    flow = run_meta.get("flow_name") or "embed-dataset"
    deployment = run_meta.get("deployment_name")
    return f"{flow}/{deployment}" if deployment else str(flow)


def run_uuid(value: Any) -> str:
    """OpenLineage run ids are UUIDs; Prefect's are too, other ids are mapped stably."""
    text = str(value)
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"clipbatch:{text}"))


@attr.define
class ClipbatchRunFacet(RunFacet):
    """Prefect identifiers, model and code version: what a platform team asks first."""

    prefect: dict[str, Any] = attr.field(factory=dict)
    model: dict[str, Any] = attr.field(factory=dict)
    code: dict[str, Any] = attr.field(factory=dict)

    @staticmethod
    def _get_schema() -> str:
        return CUSTOM_FACET_SCHEMA


def source_fields(source: SourceConfig) -> dict[str, str]:
    """Names of the source's fields for column lineage, by role."""
    if source.kind == "table":
        return {
            "image": source.image_column,
            "caption": source.caption_column or "caption",
            "key": source.key_column or "__index__",
        }
    caption = (
        f"json.{source.caption_json_field}" if source.caption_json_field else source.caption_ext
    )
    return {"image": "image", "caption": caption, "key": "__key__"}


# output column -> (source roles it is computed from, transformation subtype, description).
# Every column of the table is here or in SHARD_COLUMNS (tests/lineage/test_facets.py).
COLUMN_LINEAGE: dict[str, tuple[tuple[str, ...], str, str]] = {
    "key": (("key",), "IDENTITY", "the source key, or one derived from shard and member"),
    "source_member": (("key",), "IDENTITY", "member stem, relative path or row index"),
    "caption": (("caption",), "TRANSFORMATION", "NFC-normalised caption"),
    "caption_truncated": (("caption",), "TRANSFORMATION", "the caption passed the token limit"),
    "image_sha256": (("image",), "TRANSFORMATION", "sha256 of the raw image bytes"),
    "width": (("image",), "TRANSFORMATION", "decoded image width"),
    "height": (("image",), "TRANSFORMATION", "decoded image height"),
    "image_embedding": (("image",), "TRANSFORMATION", "CLIP encode_image"),
    "text_embedding": (("caption",), "TRANSFORMATION", "CLIP encode_text"),
    "similarity": (("image", "caption"), "TRANSFORMATION", "cosine of the two embeddings"),
    "status": (("image", "caption"), "TRANSFORMATION", "decode and validation outcome"),
    "error": (("image", "caption"), "TRANSFORMATION", "why the row is not ok"),
}
# Columns that come from the shard object (its URI and version), not from a row's field.
SHARD_COLUMNS = frozenset({"source_uri", "source_version"})


def column_lineage(source: SourceConfig, inputs: list[tuple[str, str]]) -> RunFacet:
    fields = source_fields(source)
    out: dict[str, column_lineage_dataset.Fields] = {}
    for column, (roles, subtype, description) in COLUMN_LINEAGE.items():
        out[column] = column_lineage_dataset.Fields(
            inputFields=[
                column_lineage_dataset.InputField(
                    namespace=ns,
                    name=name,
                    field=fields[role],
                    transformations=[
                        column_lineage_dataset.Transformation(
                            type="DIRECT", subtype=subtype, description=description
                        )
                    ],
                )
                for ns, name in inputs
                for role in roles
            ]
        )
    return column_lineage_dataset.ColumnLineageDatasetFacet(fields=out)


def schema_facet(schema: pa.Schema) -> schema_dataset.SchemaDatasetFacet:
    return schema_dataset.SchemaDatasetFacet(
        fields=[
            schema_dataset.SchemaDatasetFacetFields(name=f.name, type=str(f.type)) for f in schema
        ]
    )


def read_schema(uri: str, storage: Any) -> pa.Schema | None:
    try:
        fs, path = get_fs(uri, storage)
        return read_parquet_metadata(fs, path).schema.to_arrow_schema().remove_metadata()
    except (OSError, pa.ArrowInvalid) as e:
        log.debug("no schema for %s: %s", uri, e)
        return None


def iso_time(value: Any) -> str | None:
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.isoformat()


def now() -> str:
    return datetime.now(timezone.utc).isoformat()
