"""Column lineage covers the table's schema: a new column needs its lineage too."""

from __future__ import annotations

from clipbatch.lineage.openlineage.facets import COLUMN_LINEAGE, SHARD_COLUMNS, source_fields
from clipbatch.records import TABLE_COLUMNS
from clipbatch.sink.schema import build_schema


def test_every_table_column_has_lineage_or_comes_from_the_shard() -> None:
    schema_names = set(build_schema(8, "float16", []).names)
    assert schema_names == set(TABLE_COLUMNS)
    assert set(COLUMN_LINEAGE) | SHARD_COLUMNS == schema_names
    assert not set(COLUMN_LINEAGE) & SHARD_COLUMNS


def test_every_lineage_role_names_a_source_field() -> None:
    from clipbatch.config import SourceConfig

    for kind in ("webdataset", "folder", "table"):
        fields = source_fields(SourceConfig(url="x", kind=kind))
        for roles, _, _ in COLUMN_LINEAGE.values():
            assert set(roles) <= set(fields), (kind, roles)
