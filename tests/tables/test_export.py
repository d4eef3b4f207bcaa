"""``clipbatch export``: clip-retrieval's layout (img_emb/, text_emb/, metadata/), joined by
row order, the rows with both vectors only, from new (zero vectors) and old (null
vectors) tables, local and on S3."""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from clipbatch.cli import export as cli_export
from clipbatch.config import StorageOptions
from clipbatch.io.storage import get_fs
from clipbatch.tables.export import (
    FORMATS,
    MAX_ROWS_PER_PARTITION,
    ExportError,
    export_clip_retrieval,
)
from clipbatch.tables.vectors import embedding_matrix, normalize_rows
from tests.conftest import upload_dir
from tests.tables.failed_rows import EXPECTED

OK_KEYS = [k for k, (status, _, _) in EXPECTED.items() if status == "ok"]
SKIPPED = {"missing_image": 1, "missing_caption": 1, "decode_error": 1, "unsafe_path": 1}


def table_vectors(table: Path) -> dict[str, dict[str, np.ndarray]]:
    """key -> column -> the row's vector as the table stores it."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for path in sorted(table.glob("*.parquet")):
        t = pq.read_table(path)
        mats = {c: embedding_matrix(t.column(c))[0] for c in ("image_embedding", "text_embedding")}
        for i, key in enumerate(t.column("key").to_pylist()):
            out[key] = {c: m[i] for c, m in mats.items()}
    return out


def read_export(out: Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, list[str]]:
    """The export joined as clip-retrieval's readers join it: each folder sorted by name."""
    names = {f: sorted(p.name for p in (out / f).iterdir()) for f in ("img_emb", "text_emb")}
    meta_names = sorted(p.name for p in (out / "metadata").iterdir())
    stems = [n.removeprefix("img_emb_").removesuffix(".npy") for n in names["img_emb"]]
    assert names["text_emb"] == [f"text_emb_{s}.npy" for s in stems]
    assert meta_names == [f"metadata_{s}.parquet" for s in stems]
    assert len({len(s) for s in stems}) == 1  # one width: sorted by name is sorted by number
    assert [int(s) for s in stems] == list(range(len(stems)))
    meta = pd.concat([pd.read_parquet(out / "metadata" / n) for n in meta_names])
    img = np.concatenate([np.load(out / "img_emb" / n) for n in names["img_emb"]])
    txt = np.concatenate([np.load(out / "text_emb" / n) for n in names["text_emb"]])
    return meta.reset_index(drop=True), img, txt, stems


def check_export(out: Path, table: Path) -> None:
    meta, img, txt, _ = read_export(out)
    assert list(meta.columns) == ["image_path", "caption", "key", "source_uri"]
    assert meta["key"].tolist() == OK_KEYS and meta["image_path"].tolist() == OK_KEYS
    assert meta["source_uri"].str.endswith(".tar").all()
    assert img.dtype == np.float16 and txt.dtype == np.float16
    assert img.shape == txt.shape == (len(OK_KEYS), 64)
    stored = table_vectors(table)
    for i, key in enumerate(meta["key"]):
        for mat, column in ((img, "image_embedding"), (txt, "text_embedding")):
            want = normalize_rows(stored[key][column][None])[0]
            np.testing.assert_allclose(mat[i].astype(np.float32), want, atol=2e-3)
            assert abs(np.linalg.norm(mat[i].astype(np.float32)) - 1) < 2e-3


def test_export_writes_the_ok_rows_one_partition_per_shard_file(
    failed_rows_table: Path, tmp_path: Path
) -> None:
    report = export_clip_retrieval(str(failed_rows_table), str(tmp_path / "out"))
    assert (report.rows, report.partitions, report.files, report.dim) == (6, 2, 2, 64)
    assert dict(report.skipped) == SKIPPED
    assert report.model["name"] == "tiny"
    check_export(tmp_path / "out", failed_rows_table)
    _, img, _, stems = read_export(tmp_path / "out")
    assert stems == ["0", "1"]
    assert report.summary() == (
        f"exported 6 rows in 2 partition(s) from 2 file(s) to {tmp_path / 'out'} "
        "(clip-retrieval layout); skipped 4 rows (1 decode_error, 1 missing_caption, "
        "1 missing_image, 1 unsafe_path)"
    )


def test_an_old_table_with_null_vectors_exports_the_same(
    failed_rows_table: Path, old_table: Path, tmp_path: Path
) -> None:
    assert pq.read_table(old_table / "00000.parquet").column("image_embedding").null_count
    new = export_clip_retrieval(str(failed_rows_table), str(tmp_path / "new"))
    old = export_clip_retrieval(str(old_table), str(tmp_path / "old"))
    assert (old.rows, old.partitions, dict(old.skipped)) == (new.rows, new.partitions, SKIPPED)
    for a, b in zip(read_export(tmp_path / "new"), read_export(tmp_path / "old"), strict=True):
        if isinstance(a, pd.DataFrame):
            pd.testing.assert_frame_equal(a, b)
        else:
            assert np.array_equal(a, b)


def test_a_bounded_number_of_rows_per_partition_with_one_width(
    failed_rows_table: Path, tmp_path: Path
) -> None:
    report = export_clip_retrieval(
        str(failed_rows_table), str(tmp_path / "out"), max_rows_per_partition=1
    )
    assert (report.rows, report.partitions) == (6, 6)
    _, _, _, stems = read_export(tmp_path / "out")
    assert stems == ["00", "01", "02", "03", "04", "05"]  # up to 10 partitions: 2 digits
    check_export(tmp_path / "out", failed_rows_table)
    with pytest.raises(ExportError, match="at least 1"):
        export_clip_retrieval(str(failed_rows_table), str(tmp_path / "x"), max_rows_per_partition=0)


def test_an_existing_export_is_refused_unless_overwritten(
    failed_rows_table: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    export_clip_retrieval(str(failed_rows_table), str(out), max_rows_per_partition=1)
    with pytest.raises(ExportError, match="img_emb is not empty.*--overwrite"):
        export_clip_retrieval(str(failed_rows_table), str(out))
    report = export_clip_retrieval(str(failed_rows_table), str(out), overwrite=True)
    assert report.partitions == 2
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_0.npy", "img_emb_1.npy"]
    check_export(out, failed_rows_table)


def test_an_export_inside_the_table_root_must_be_bookkeeping(
    failed_rows_table: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    shutil.copytree(failed_rows_table, root)
    with pytest.raises(ExportError, match="inside the table root"):
        export_clip_retrieval(str(root), str(root / "export"))
    with pytest.raises(ExportError, match="inside the table root"):
        export_clip_retrieval(str(root), str(root))
    assert not (root / "export").exists()
    export_clip_retrieval(str(root), str(root / "_export"))
    check_export(root / "_export", failed_rows_table)
    # The export is bookkeeping: the table still reads as its two shard files.
    assert export_clip_retrieval(str(root), str(tmp_path / "again")).files == 2


def _set_model_sha(path: Path, sha: str) -> None:
    footer = {k: v for k, v in pq.read_metadata(path).metadata.items() if k != b"ARROW:schema"}
    meta = json.loads(footer[b"clipbatch"])
    meta["model"]["checkpoint_sha256"] = sha
    footer[b"clipbatch"] = json.dumps(meta).encode()
    pq.write_table(pq.read_table(path).replace_schema_metadata(footer), path)


def test_a_partition_root_exports_every_table_but_never_two_models(
    failed_rows_table: Path, old_table: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    shutil.copytree(old_table, root / "date=2024-01-01")  # null vectors
    shutil.copytree(failed_rows_table, root / "date=2024-01-02")  # zero vectors
    report = export_clip_retrieval(str(root), str(tmp_path / "out"))
    assert (report.tables, report.files, report.partitions, report.rows) == (2, 4, 4, 12)
    assert report.skipped == {k: 2 * v for k, v in SKIPPED.items()}
    meta, img, _, _ = read_export(tmp_path / "out")
    assert meta["key"].tolist() == OK_KEYS * 2
    assert np.array_equal(img[:6], img[6:])
    _set_model_sha(root / "date=2024-01-02" / "00001.parquet", "f" * 64)
    with pytest.raises(ExportError, match="different models"):
        export_clip_retrieval(str(root), str(tmp_path / "two-models"))
    assert not (tmp_path / "two-models").exists()


def test_export_on_s3_and_the_command(
    failed_rows_table: Path, old_table: Path, s3_endpoint: str, s3_bucket: str, capsys
) -> None:
    root = upload_dir(old_table, s3_bucket, "old-table", s3_endpoint)
    out = f"s3://{s3_bucket}/exports/clip/"
    parser = argparse.ArgumentParser()
    cli_export.add_arguments(parser)
    args = parser.parse_args([root, "--to", out, "--endpoint-url", s3_endpoint])
    assert args.format == "clip-retrieval"
    assert cli_export.run(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("exported 6 rows in 2 partition(s) from 2 file(s) to s3://")
    assert line.endswith(
        "skipped 4 rows (1 decode_error, 1 missing_caption, 1 missing_image, 1 unsafe_path)"
    )
    fs, base = get_fs(out, StorageOptions(endpoint_url=s3_endpoint))
    base = base.rstrip("/") + "/"
    listed = sorted(p.removeprefix(base) for p in fs.find(base))
    assert listed == [
        f"{folder}/{folder}_{i}.{ext}"
        for folder, ext in (("img_emb", "npy"), ("metadata", "parquet"), ("text_emb", "npy"))
        for i in (0, 1)
    ]
    img = np.concatenate(
        [np.load(io.BytesIO(fs.cat_file(f"{base}img_emb/img_emb_{i}.npy"))) for i in (0, 1)]
    )
    meta = pd.concat(
        [
            pd.read_parquet(io.BytesIO(fs.cat_file(f"{base}metadata/metadata_{i}.parquet")))
            for i in (0, 1)
        ]
    )
    assert meta["key"].tolist() == OK_KEYS and img.shape == (6, 64) and img.dtype == np.float16
    stored = table_vectors(failed_rows_table)
    want = normalize_rows(np.stack([stored[k]["image_embedding"] for k in OK_KEYS]))
    np.testing.assert_allclose(img.astype(np.float32), want, atol=2e-3)
    # A second export to the same folder is refused: the command exits through ClipbatchError.
    with pytest.raises(ExportError, match="not empty"):
        cli_export.run(args)


def test_the_command_names_the_library_formats_and_default() -> None:
    parser = argparse.ArgumentParser()
    cli_export.add_arguments(parser)
    assert cli_export.FORMATS == FORMATS
    assert f"{MAX_ROWS_PER_PARTITION:,}" in parser.format_help()
    args = parser.parse_args(["root", "--to", "dir"])
    assert args.max_rows_per_partition is None and not args.overwrite
    with pytest.raises(SystemExit):
        parser.parse_args(["root", "--to", "dir", "--format", "lance"])
