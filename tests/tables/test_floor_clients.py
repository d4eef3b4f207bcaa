"""The declared pyarrow floor, true: clipbatch writes a table with failed rows under
pyarrow at pyproject.toml's floor (``.venv-floor``, built by ``make test``), and the
clients of that environment (pyarrow, pandas with numpy 1.x, embedding-reader,
autofaiss 2.18) read it; they read a table written with this venv's pyarrow, and
``clipbatch export``'s output of an old table (null vectors), too.

``.venv-floor`` takes torch, clip and the package from this venv (a .pth file after its
own site-packages); the tests run it in subprocesses and install nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import tomllib

from clipbatch.query.validate import validate
from clipbatch.tables.export import export_clip_retrieval
from clipbatch.tables.table import open_table
from tests.paths import REPO
from tests.tables.failed_rows import EXPECTED

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FLOOR_PYTHON = REPO / ".venv-floor" / "bin" / "python"
OK_KEYS = [k for k, (status, _, _) in EXPECTED.items() if status == "ok"]


@pytest.fixture(scope="module")
def floor() -> Path:
    if not (REPO / ".venv-floor" / ".installed").exists():
        pytest.skip(
            ".venv-floor is absent: `make test` builds it (the Makefile's .venv-floor rule)"
        )
    return FLOOR_PYTHON


def in_floor(floor: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(floor), "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def floor_json(floor: Path, *args: str) -> dict:
    done = in_floor(floor, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def declared_floor() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"pyarrow\b", d)]
    return re.fullmatch(r"pyarrow>=([\d.]+)", spec.split(";")[0].strip()).group(1)


@pytest.fixture(scope="module")
def floor_table(floor: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The failed-rows table, written by clipbatch under the floor's pyarrow."""
    base = tmp_path_factory.mktemp("floor")
    done = in_floor(floor, "tests.tables.failed_rows", str(base / "src"), str(base / "table"))
    assert done.returncode == 0, done.stderr[-3000:]
    return base / "table"


def assert_read(result: dict) -> None:
    assert result["rows"] == len(EXPECTED) and result["keys"] == list(EXPECTED)
    assert result["ok_keys"] == result["filtered"] == OK_KEYS
    assert result["nulls"] == {"image_embedding": 0, "text_embedding": 0}
    assert result["arrow_types"] == ["fixed_size_list<element: halffloat>[64]"]
    for column, i in (("image_embedding", 1), ("text_embedding", 2)):
        assert result[f"{column}.dtype"] == "float16"
        assert result[f"{column}.shape"] == [len(EXPECTED), 64]
        assert result[f"{column}.present"] == [v[i] for v in EXPECTED.values()], column


def test_the_floor_venv_holds_the_declared_floor(floor: Path) -> None:
    code = (
        "import json, numpy, pandas, pyarrow, torch, clipbatch\n"
        "torch.from_numpy(numpy.ones(2, numpy.float32))\n"
        "print(json.dumps({'pyarrow': pyarrow.__version__, 'numpy': numpy.__version__,"
        " 'pandas': pandas.__version__, 'pyarrow_from': pyarrow.__file__,"
        " 'clipbatch': clipbatch.__file__}))"
    )
    done = subprocess.run([str(floor), "-c", code], cwd="/", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["pyarrow"] == declared_floor() or got["pyarrow"].startswith(declared_floor() + ".")
    assert got["numpy"].startswith("1.")
    assert tuple(int(x) for x in got["pandas"].split(".")[:2]) < (2, 3)
    assert got["pyarrow_from"].startswith(str(REPO / ".venv-floor"))
    assert Path(got["clipbatch"]).is_relative_to(REPO / "clipbatch")  # this checkout, from .pth


def test_clipbatch_writes_failed_rows_under_the_floor_and_reads_them_back(
    floor: Path, floor_table: Path
) -> None:
    assert_read(floor_json(floor, "tests.tables.floor_reads", "read", str(floor_table)))
    # ... and this venv's pyarrow and clipbatch's checks read what the floor wrote.
    meta = json.loads(pq.read_metadata(floor_table / "00000.parquet").metadata[b"clipbatch"])
    assert meta["counts"] == {"ok": 3, "missing_image": 1, "missing_caption": 1}
    report = validate(open_table(str(floor_table)))
    assert report.ok, report.problems


def test_embedding_reader_and_autofaiss_index_the_floor_written_files(
    floor: Path, floor_table: Path, tmp_path: Path
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    for path in floor_table.glob("*.parquet"):
        shutil.copy(path, files)
    got = floor_json(floor, "tests.tables.floor_reads", "index", str(files))
    assert (got["count"], got["dimension"], got["ntotal"]) == (len(EXPECTED), 64, len(EXPECTED))
    assert got["versions"]["autofaiss"] == "2.18.0"
    assert got["keys"] == list(EXPECTED)
    assert got["present"] == [v[1] for v in EXPECTED.values()]  # zeros where none
    assert got["top"][0] == "good-1"
    # The table folder itself is not theirs to read: embedding-reader globs **/*.parquet,
    # the commit index's segments (_commits/*.parquet) included. `clipbatch export` is.
    done = in_floor(floor, "tests.tables.floor_reads", "index", str(floor_table))
    assert done.returncode != 0 and "_commits/" in done.stderr


def test_a_table_written_with_this_venvs_pyarrow_reads_under_the_floor(
    floor: Path, failed_rows_table: Path
) -> None:
    got = floor_json(floor, "tests.tables.floor_reads", "read", str(failed_rows_table))
    assert got["versions"]["pyarrow"].startswith(declared_floor())
    assert_read(got)


def test_the_export_of_an_old_table_is_indexed_under_the_floor(
    floor: Path, old_table: Path, tmp_path: Path
) -> None:
    assert pq.read_table(old_table / "00001.parquet").column("text_embedding").null_count
    out = tmp_path / "export"
    assert export_clip_retrieval(str(old_table), str(out)).rows == len(OK_KEYS)
    got = floor_json(floor, "tests.tables.floor_reads", "index-export", str(out))
    for folder in ("img_emb", "text_emb"):
        part = got[folder]
        assert (part["count"], part["ntotal"]) == (len(OK_KEYS), len(OK_KEYS)), folder
        assert part["keys"] == OK_KEYS and part["paths_are_keys"], folder
        assert all(abs(n - 1) < 2e-3 for n in part["norms"]), folder
        assert part["top"][0] == "good-1" and part["top_score"] == pytest.approx(1, abs=2e-3)


def test_the_floor_is_not_skipped_where_make_test_runs() -> None:
    """`make test` builds .venv-floor first; CI must not skip the floor silently."""
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^test: .*\$\(FLOOR\)/\.installed", makefile, re.M)
    pinned = re.search(r"^FLOOR_PYARROW \?= ([\d.]+)$", makefile, re.M).group(1)
    assert pinned.startswith(declared_floor() + ".") or pinned == declared_floor()
