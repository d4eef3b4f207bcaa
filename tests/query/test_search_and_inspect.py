"""``clipbatch search`` and ``clipbatch inspect`` on local and S3 tables."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from clipbatch_flows.cli.main import main

from clipbatch.cli.inspect import INCONSISTENT
from clipbatch.config import StorageOptions, build_config
from clipbatch.query.search import TextQueryEncoder, search
from clipbatch.synthetic import write_webdataset
from clipbatch.tables.table import open_table
from clipbatch.tables.vectors import embedding_matrix, normalize_rows
from tests.conftest import upload_dir

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def table_dir(prefect_harness, tmp_path_factory) -> Path:
    """A small output table written by the flow, on local disk (tests copy it to tamper)."""
    from clipbatch_flows.embed import embed_dataset

    root = tmp_path_factory.mktemp("cliquery")
    write_webdataset(root / "wds", shards=2, per_shard=12, seed=11, size=64)
    dest = root / "emb"
    config = build_config(
        {
            "source": {"url": str(root / "wds"), "kind": "webdataset"},
            "sink": {"url": str(dest)},
            "model": {"name": "tiny"},
            "runtime": {"device": "cpu", "batch_size": 32, "task_retries": 0},
        }
    )
    assert embed_dataset(config)["shards_committed"] == 2
    return dest


class Reference:
    """Expected search results from clip's own calls, not from clipbatch's encoder path:
    the tiny checkpoint through ``clip.load``, ``encode_text(clip.tokenize(q))``, and the
    cosine with every stored image vector of the table."""

    def __init__(self, table_dir: Path) -> None:
        import clip
        import torch

        from clipbatch.models.openai import TINY_CHECKPOINT

        output = open_table(str(table_dir))
        assert output.model_metadata()["name"] == "tiny"
        model, _ = clip.load(str(TINY_CHECKPOINT), device="cpu", jit=False)
        self.model, self.clip, self.torch = model.float().eval(), clip, torch
        table = output.read_all()
        img, _ = embedding_matrix(table.column("image_embedding"))
        self.images = normalize_rows(img).astype(np.float64)
        self.keys = table.column("key").to_pylist()
        self.captions = table.column("caption").to_pylist()

    def query(self, text: str) -> np.ndarray:
        with self.torch.no_grad():
            t = self.model.encode_text(self.clip.tokenize([text], truncate=True))[0]
        t = t.double().numpy()
        return t / np.linalg.norm(t)

    def scores(self, text: str) -> dict[str, float]:
        """Every key's cosine with ``text``."""
        return dict(zip(self.keys, self.images @ self.query(text), strict=True))

    def top(self, text: str, k: int) -> list[tuple[str, float, str]]:
        """(key, score, caption) of the ``k`` best rows."""
        scores = self.images @ self.query(text)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(self.keys[i], float(scores[i]), self.captions[i]) for i in order]

    def check_listing(self, text: str, listed: list[tuple[float, str, str]], k: int) -> None:
        """``listed`` ((score, key, caption) as printed, 3 decimals) are the k best rows."""
        scores = self.scores(text)
        captions = dict(zip(self.keys, self.captions, strict=True))
        best = [s for _, s, _ in self.top(text, k)]
        assert len(listed) == k, listed
        for (score, key, caption), want in zip(listed, best, strict=True):
            assert abs(score - want) <= 1.5e-3, (text, key, score, want)  # the k best scores
            assert abs(scores[key] - score) <= 1.5e-3, (text, key)  # and this key's own
            assert caption == captions[key]


HIT_LINE = re.compile(r"^\s+(?:\d+\.\s+)?([+-]\d\.\d{3})\s\s(\S+)\s\s(.*)$")


def listed_hits(section: str) -> dict[str, list[tuple[float, str, str]]]:
    """Printed results by query: the lines after each quoted query."""
    out: dict[str, list[tuple[float, str, str]]] = {}
    current = None
    for line in section.splitlines():
        stripped = line.strip()
        if len(stripped) > 1 and stripped[0] == stripped[-1] == "'":
            current = out.setdefault(ast.literal_eval(stripped), [])
        elif current is not None and (m := HIT_LINE.match(line)):
            current.append((float(m.group(1)), m.group(2), m.group(3)))
    return out


@pytest.fixture(scope="module")
def reference(table_dir: Path) -> Reference:
    return Reference(table_dir)


@pytest.fixture
def copy_of(table_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "emb"
    shutil.copytree(table_dir, dest)
    return dest


def test_search_ranks_every_image_by_cosine_across_shards(
    table_dir: Path, reference: Reference
) -> None:
    output = open_table(str(table_dir))
    [hits] = search(output, ["a red circle"], k=output.rows)
    expected = reference.top("a red circle", output.rows)
    own = reference.scores("a red circle")
    assert sorted(h.key for h in hits) == sorted(reference.keys)  # every row, once
    for hit, (key, score, _) in zip(hits, expected, strict=True):
        # Ranked as clip's own text vector ranks them; a swap only where scores tie.
        assert abs(hit.score - score) < 1e-4, (hit.rank, hit.key, key)
        assert abs(own[hit.key] - hit.score) < 1e-4, hit.key
    assert [h.key for h in hits][:3] == [k for k, _, _ in expected][:3]
    assert [h.rank for h in hits] == list(range(1, output.rows + 1))
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True) and -1 <= scores[-1] <= scores[0] <= 1
    # The query vector itself is clip's.
    query = TextQueryEncoder(output, "cpu")(["a red circle"])[0]
    assert float(query @ reference.query("a red circle")) >= 0.9999


def test_search_cli_local(
    table_dir: Path, reference: Reference, capsys: pytest.CaptureFixture[str]
) -> None:
    queries = ["a red circle", "a large blue square"]
    assert main(["search", *queries, "--table", str(table_dir), "-k", "3"]) == 0
    out = capsys.readouterr().out
    listed = listed_hits(out)
    assert list(listed) == queries  # in the order asked, each under its query
    for query in queries:
        reference.check_listing(query, listed[query], 3)
    assert "model tiny" in out


def test_search_cli_s3_by_flag_and_by_environment(
    table_dir: Path,
    s3_bucket: str,
    s3_endpoint: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = upload_dir(table_dir, s3_bucket, "emb", s3_endpoint)
    [local] = search(open_table(str(table_dir)), ["a green triangle"], k=4)
    [remote] = search(
        open_table(url, StorageOptions(endpoint_url=s3_endpoint)), ["a green triangle"], k=4
    )
    assert remote == local

    assert (
        main(
            ["search", "a green triangle", "--table", url, "--endpoint-url", s3_endpoint, "-k", "4"]
        )
        == 0
    )
    by_flag = capsys.readouterr().out
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert main(["search", "a green triangle", "--table", url, "-k", "4"]) == 0
    by_env = capsys.readouterr().out
    for hit in local:
        assert hit.key in by_flag and hit.key in by_env


def test_inspect_reports_a_consistent_table(
    table_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(table_dir)]) == 0
    out = capsys.readouterr().out
    sha = open_table(str(table_dir)).model_metadata()["checkpoint_sha256"]
    assert "shards:   2" in out and "rows:     24" in out
    assert "status:   ok=24" in out
    assert "dtype:    float16; dim 64" in out
    assert f"model:    tiny (checkpoint sha256 {sha})" in out
    lo, hi = (float(x) for x in out.split("norms:")[1].split("\n")[0].split(".."))
    assert 0.99 < lo <= hi < 1.01
    assert "result:   consistent" in out


def rewrite(path: Path, change) -> None:
    """Rewrite one shard file, keeping its footer metadata (which then no longer fits)."""
    footer = {k: v for k, v in pq.read_metadata(path).metadata.items() if k != b"ARROW:schema"}
    table = change(pq.read_table(path))
    pq.write_table(table.replace_schema_metadata(footer), path)


def test_inspect_fails_on_a_non_unit_norm(
    copy_of: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def scale(table):
        img, _ = embedding_matrix(table.column("image_embedding"))
        img[3] *= 2
        typ = table.schema.field("image_embedding").type
        flat = pa.array(img.astype(np.float16).ravel())
        column = pa.FixedSizeListArray.from_arrays(flat, typ.list_size)
        return table.set_column(
            table.schema.get_field_index("image_embedding"), "image_embedding", column
        )

    rewrite(copy_of / "00001.parquet", scale)
    assert main(["inspect", str(copy_of)]) == INCONSISTENT
    out = capsys.readouterr().out
    assert "00001.parquet: 1 image_embedding vectors are not unit length" in out
    assert "INCONSISTENT" in out


def test_inspect_fails_on_a_row_count_that_differs_from_the_metadata(
    copy_of: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rewrite(copy_of / "00000.parquet", lambda t: t.slice(0, t.num_rows - 1))
    assert main(["inspect", str(copy_of)]) == INCONSISTENT
    out = capsys.readouterr().out
    assert "00000.parquet: 11 rows, but its metadata says 12" in out
    assert "commit index says shard 00000 has 12 rows, its file 11" in out


def test_inspect_fails_on_a_duplicate_key(
    copy_of: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def duplicate_first_key(table):
        keys = table.column("key").to_pylist()
        keys[1] = keys[0]
        return table.set_column(0, table.schema.field("key"), [keys])

    rewrite(copy_of / "00000.parquet", duplicate_first_key)
    assert main(["inspect", str(copy_of)]) == INCONSISTENT
    out = capsys.readouterr().out
    assert "appears 2 times" in out


def test_inspect_fails_on_a_failed_row_that_carries_a_vector(
    copy_of: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail_row(table):
        status = table.column("status").to_pylist()
        status[0] = "decode_error"
        idx = table.schema.get_field_index("status")
        return table.set_column(idx, table.schema.field("status"), [status])

    rewrite(copy_of / "00001.parquet", fail_row)
    assert main(["inspect", str(copy_of)]) == INCONSISTENT
    out = capsys.readouterr().out
    assert "00001.parquet: 1 failed rows carry an image_embedding vector" in out
    assert "status counts" in out


def test_inspect_and_search_refuse_a_missing_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_answers_text_queries_from_its_table(
    prefect_harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from clipbatch_flows.cli.demo import DEMO_QUERIES

    argv = ["demo", "--dir", str(tmp_path), "--shards", "1", "--per-shard", "12"]
    assert main([*argv, "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "trained on synthetic shapes" in out
    section = out.split("search:", 1)[1]
    listed = listed_hits(section)
    assert list(listed) == list(DEMO_QUERIES)
    demo_reference = Reference(tmp_path / "embeddings")
    for query in DEMO_QUERIES:
        demo_reference.check_listing(query, listed[query], 3)


def test_inspect_applies_the_keep_rule_per_column(
    copy_of: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A caption problem keeps the image vector (fine) but not the text vector (flagged);
    a similarity without both vectors is flagged too."""

    def caption_problem(table):
        status = table.column("status").to_pylist()
        status[0] = "missing_caption"
        idx = table.schema.get_field_index("status")
        table = table.set_column(idx, table.schema.field("status"), [status])
        img = table.column("image_embedding").combine_chunks()
        nulls = pa.array([i == 1 for i in range(table.num_rows)])
        values = img.values
        masked = pa.FixedSizeListArray.from_arrays(values, img.type.list_size, mask=nulls)
        return table.set_column(
            table.schema.get_field_index("image_embedding"), "image_embedding", masked
        )

    rewrite(copy_of / "00001.parquet", caption_problem)
    assert main(["inspect", str(copy_of)]) == INCONSISTENT
    out = capsys.readouterr().out
    assert "1 failed rows carry an text_embedding vector" in out and "missing_caption" in out
    assert "image_embedding vector" not in out  # missing_caption may keep its image vector
    assert "00001.parquet: 1 rows have a similarity but not both vectors" in out
