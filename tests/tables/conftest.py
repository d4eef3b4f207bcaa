"""One table with failed rows (written by clipbatch's writer, zero vectors) and its
old-style copy (null vectors), shared by the tests of this folder; read-only."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tables.failed_rows import embed, write_old_table, write_source


@pytest.fixture(scope="session")
def failed_rows_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The table of :mod:`tests.tables.failed_rows`, written with this venv's pyarrow."""
    base = tmp_path_factory.mktemp("failed-rows")
    return embed(write_source(base / "src"), base / "table")


@pytest.fixture(scope="session")
def old_table(failed_rows_table: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same rows as the previous writer stored them: null vectors."""
    return write_old_table(failed_rows_table, tmp_path_factory.mktemp("old") / "table")
