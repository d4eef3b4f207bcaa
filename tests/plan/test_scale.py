"""Issue 14: a run's cost per shard does not grow with the dataset; old tables upgrade.

Requests and bytes are counted by a proxy of ours in front of moto's S3 server (every
forwarded request, heads and bodies included), for whole flow runs over 20 and 200
shards: planning, encoding, commits, index and lineage. Per shard, they must not grow
with the dataset, for a prefix source and for a brace pattern; a rerun that skips every
shard costs listing pages and a few index reads, not a request per shard.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import boto3
import pytest

from clipbatch.config import build_config
from clipbatch.sink.commits.index import all_records, listed_versions, load_index
from clipbatch.sink.commits.segments import COMMITS_DIR, FLUSH_RECORDS, FLUSH_SECONDS
from clipbatch.synthetic import write_webdataset
from clipbatch.upgrade.manifest_v1 import LEGACY_MANIFEST
from tests.faultproxy import Exchange, FaultProxy
from tests.helpers import tiny_s3_config
from tests.paths import DATA

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

# Two sizes, 5x apart: a per-shard cost that grows with the dataset shows (exact asserts).
SIZES = (20, 100)
PER_SHARD = 2
FIXTURE = DATA / "upgrade-v1"


@dataclass
class Tally:
    shards: int
    requests: int
    bytes: int
    by_kind: Counter  # requests by kind of object
    bytes_by_kind: Counter

    @property
    def requests_per_shard(self) -> float:
        return self.requests / self.shards

    @property
    def bytes_per_shard(self) -> float:
        return self.bytes / self.shards


def kind_of(ex: Exchange) -> str:
    """What a request was for, from its key: per-shard kinds, and bookkeeping kinds."""
    parts = urlsplit(ex.target)
    key = unquote(parts.path)
    if any(q in parts.query for q in ("list-type", "delimiter", "prefix=")):
        return "list"
    if key.endswith((".tar", ".tgz", ".tar.gz")):
        return "source"
    for marker, kind in (
        (f"/{COMMITS_DIR}/", "index"),
        ("/_lineage/", "lineage"),
        ("/_tmp/", "staging"),
        ("/_members/", "members"),
        (f"/{LEGACY_MANIFEST}", "manifest"),
    ):
        if marker in key:
            return kind
    if key.endswith(".parquet"):
        return "output"
    return "other"  # e.g. a HEAD on a prefix while planning


PAGE = 1000  # keys per S3 ListObjectsV2 page


def pages(keys: int) -> int:
    """List requests to see ``keys`` keys: one page per 1,000, and one for none at all."""
    return max(1, math.ceil(keys / PAGE))


def bookkeeping_caps(n: int, form: str, first_run: bool, seconds: float) -> dict[str, int]:
    """The most requests of each bookkeeping kind a whole flow run over ``n`` shards may
    make, named one by one from the code (flows/embed.py, plan/, sink/commits/), with
    listings in pages. ``seconds`` is how long the run took: the commit index also flushes
    a part every FLUSH_SECONDS. s3fs's ``ls`` of an empty prefix lists its parent too (to
    tell an empty folder from a missing one), and its ``exists`` of a missing key is a
    HEAD then a LIST of max-keys 1; both are counted where they happen."""
    # The dest before this run: nothing (first run), or n shard files plus the bookkeeping
    # prefixes _commits/, _lineage/, _members/.
    dest_keys = 0 if first_run else n + 3
    # The commit index's part segments: one per FLUSH_RECORDS commits, one per
    # FLUSH_SECONDS of the run; a rerun commits nothing and writes none.
    parts = math.ceil(n / FLUSH_RECORDS) + int(seconds // FLUSH_SECONDS) if first_run else 0
    # The segments a rerun's plan reads: what the first run left (its parts merged into one).
    segments = 0 if first_run else 1
    lists = (
        # clean_staging: LIST {dest}/_tmp/ (empty: no staging left over), and its parent.
        2
        # the source listing: s3fs's folder check (LIST max-keys=1), then the recursive
        # listing (prefix form); or one LIST of the expanded names' folder (brace form).
        + (1 + pages(n) if form == "prefix" else pages(n))
        # the dest listing (listed_versions); an empty dest: and its parent (bucket root).
        + pages(dest_keys)
        + (1 if dest_keys == 0 else 0)
        # the commit index's segment listing (load_index); none yet: and its parent.
        + 1
        + (1 if segments == 0 else 0)
        # the legacy-manifest probe (load_index): the LIST after its HEAD.
        + 1
        # at close, compact_if_due: the segment listing, and the legacy probe's LIST.
        + 1
        + 1
    )
    index = (
        # the plan reads each segment: a HEAD and a GET (read_bytes).
        2 * segments
        # each part segment written: one PUT.
        + parts
        # more than one part: read each back (HEAD + GET), PUT the merged one, delete each.
        + (3 * parts + 1 if parts > 1 else 0)
        # compaction: only past MAX_SEGMENTS segments, never in these two runs.
        + 0
    )
    other = (
        # preflight's destination bucket check: HEAD bucket.
        1
        # the source's kind detection: a HEAD of the URL as an object (prefix form).
        + (1 if form == "prefix" else 0)
        # a merge's bulk delete of the part segments (POST ?delete on the bucket).
        + (1 if parts > 1 else 0)
    )
    return {"list": lists, "index": index, "other": other}


def tally(exchanges: list[Exchange], shards: int) -> Tally:
    by_kind: Counter = Counter()
    nbytes: Counter = Counter()
    for ex in exchanges:
        kind = kind_of(ex)
        by_kind[kind] += 1
        nbytes[kind] += ex.sent + ex.received
    return Tally(shards, sum(by_kind.values()), sum(nbytes.values()), by_kind, nbytes)


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str, tmp_path_factory) -> str:
    """One bucket with a dataset of each size: s3://bucket/src{N}/00000.tar ..."""
    name = f"scale-{uuid.uuid4().hex[:10]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=name)
    for n in SIZES:
        local = tmp_path_factory.mktemp(f"src{n}")
        write_webdataset(local, shards=n, per_shard=PER_SHARD, seed=n, size=32)
        for tar in sorted(local.glob("*.tar")):
            s3.upload_file(str(tar), name, f"src{n}/{tar.name}")
    return name


def source_url(bucket: str, n: int, form: str) -> str:
    if form == "prefix":
        return f"s3://{bucket}/src{n}/"
    return f"s3://{bucket}/src{n}/{{00000..{n - 1:05d}}}.tar"


def counted_run(config_for, proxy: FaultProxy) -> tuple[dict, list[Exchange], float]:
    """A flow run through the proxy: its summary, its requests, and how long it took (an
    input to the index's cap: its writer flushes by time too)."""
    from clipbatch_flows.embed import embed_dataset

    proxy.clear_exchanges()
    start = time.monotonic()
    summary = embed_dataset(config_for(proxy.url))
    return summary, proxy.recorded(), time.monotonic() - start


@pytest.mark.parametrize("form", ["prefix", "brace"])
def test_requests_and_bytes_per_shard_do_not_grow_with_the_dataset(
    prefect_harness, bucket: str, s3_endpoint: str, form: str
) -> None:
    first: dict[int, Tally] = {}
    rerun: dict[int, Tally] = {}
    caps: dict[tuple[int, bool], dict[str, int]] = {}
    proxy = FaultProxy(s3_endpoint).start()
    try:
        for n in SIZES:
            dest = f"s3://{bucket}/emb-{form}-{n}/"

            def config_for(endpoint: str, n: int = n, dest: str = dest):
                # Batches of one shard's rows: the model's cost per shard is the same at
                # both sizes, so any growth is the orchestration's.
                return tiny_s3_config(
                    source_url(bucket, n, form), dest, endpoint, batch_size=8, decode_workers=1
                )

            summary, exchanges, seconds = counted_run(config_for, proxy)
            assert summary["shards_committed"] == n and summary["shards_failed"] == 0
            first[n] = tally(exchanges, n)
            caps[n, True] = bookkeeping_caps(n, form, True, seconds)
            summary, exchanges, seconds = counted_run(config_for, proxy)
            assert summary["shards_skipped"] == n and summary["shards_committed"] == 0
            rerun[n] = tally(exchanges, n)
            caps[n, False] = bookkeeping_caps(n, form, False, seconds)
    finally:
        proxy.stop()
    small, big = first[SIZES[0]], first[SIZES[1]]
    report = {
        n: (t.requests_per_shard, t.bytes_per_shard, dict(t.by_kind)) for n, t in first.items()
    }
    # Whole runs, per shard: planning, reading, staging, commits, index and lineage.
    assert big.requests_per_shard <= small.requests_per_shard, report
    assert big.bytes_per_shard <= 1.05 * small.bytes_per_shard, report
    # What each shard costs itself is exactly the same at both sizes.
    for kind in ("source", "staging", "output", "members"):
        assert big.by_kind[kind] * small.shards == small.by_kind[kind] * big.shards, (kind, report)
    # Bookkeeping (listings, index) is a handful of requests per run, not per shard: a
    # listing page holds 1,000 keys, so both sizes list in the same number of pages.
    for kind in ("list", "index", "other"):
        assert big.by_kind[kind] <= small.by_kind[kind] + 2, (kind, report)
        # Each run, first and rerun, within its cap named request by request.
        for n in SIZES:
            assert first[n].by_kind[kind] <= caps[n, True][kind], (kind, n, caps, report)
            assert rerun[n].by_kind[kind] <= caps[n, False][kind], (kind, n, caps, report)
    # The legacy-manifest probe's HEAD: once when planning, once at close.
    assert all(t.by_kind["manifest"] <= 2 for t in (*first.values(), *rerun.values())), report
    # The run record is small and rewritten at most every few seconds: its requests and
    # bytes follow the run's duration, never the dataset's size squared.
    assert big.by_kind["lineage"] / big.shards <= small.by_kind["lineage"] / small.shards
    assert (
        big.bytes_by_kind["lineage"] / big.shards <= small.bytes_by_kind["lineage"] / small.shards
    )
    # The index costs the same per commit: segment bytes per committed shard do not grow.
    per_commit = {n: t.bytes_by_kind["index"] / n for n, t in first.items()}
    assert per_commit[SIZES[1]] <= per_commit[SIZES[0]], per_commit
    # A rerun plans from one listing of each side and the index: no request per shard.
    rerun_report = {n: dict(t.by_kind) for n, t in rerun.items()}
    assert rerun[SIZES[1]].requests == rerun[SIZES[0]].requests, rerun_report
    assert rerun[SIZES[1]].by_kind["source"] == 0 and rerun[SIZES[1]].by_kind["output"] == 0


def test_planning_lists_a_brace_pattern_once_with_no_head_per_name(
    bucket: str, s3_endpoint: str
) -> None:
    """200 expanded names and their missing sidecars: one listing, zero HEADs."""
    from clipbatch.plan.planner import plan_shards

    proxy = FaultProxy(s3_endpoint).start()
    try:
        n = SIZES[1]
        config = tiny_s3_config(
            source_url(bucket, n, "brace"), f"s3://{bucket}/plan-only/", proxy.url
        )
        plan = plan_shards(config)
        exchanges = proxy.recorded()
    finally:
        proxy.stop()
    assert len(plan.todo) == n and plan.config.source.kind == "webdataset"
    heads = [ex.target for ex in exchanges if ex.method == "HEAD" and "/src" in ex.target]
    assert heads == []  # neither the expanded names nor their (absent) sidecars
    kinds = Counter(kind_of(ex) for ex in exchanges)
    # plan_shards alone (no preflight, no staging clean-up) on a dest that does not exist:
    lists = (
        pages(n)  # the source: one LIST of the expanded names' folder, 1,000 keys a page
        + 1  # the dest listing (listed_versions): no keys, one page ...
        + 1  # ... and, as it is empty, s3fs's LIST of its parent to tell empty from missing
        + 1  # the commit index's segment listing (load_index): none ...
        + 1  # ... and its parent's listing, likewise
        + 1  # the legacy-manifest probe: after its HEAD, s3fs's LIST max-keys=1
    )
    heads_elsewhere = 1  # the legacy-manifest probe's HEAD of {dest}/_manifest.json
    assert kinds["source"] == 0 and kinds["list"] <= lists, kinds
    assert len(exchanges) <= lists + heads_elsewhere, [(ex.method, ex.target) for ex in exchanges]


def test_a_missing_name_in_a_brace_pattern_is_a_clear_error(bucket: str, s3_endpoint: str):
    from clipbatch.errors import SourceError
    from clipbatch.plan.planner import plan_shards

    config = tiny_s3_config(
        f"s3://{bucket}/src20/{{00000..00020}}.tar", f"s3://{bucket}/x/", s3_endpoint
    )
    with pytest.raises(SourceError, match=r"src20/00020.tar \(from brace pattern"):
        plan_shards(config)


def test_a_table_written_before_the_commit_index_is_skipped_then_migrated(
    prefect_harness, s3_endpoint: str, tmp_path: Path
) -> None:
    """The fixture was written by the previous release (tests/data/upgrade-v1): shard files,
    a `_manifest.json` and formula-1 fingerprints. Nothing is re-encoded after an upgrade;
    the first run folds the manifest into the commit index, and the table stays valid."""
    from clipbatch_flows.cli.main import main as cli
    from clipbatch_flows.embed import embed_dataset

    name = "clipbatch-upgrade"  # the fingerprints hash s3://clipbatch-upgrade/v1/src/...
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=name)
    for path in sorted(FIXTURE.rglob("*")):
        if path.is_file() and path.parent != FIXTURE:
            s3.upload_file(str(path), name, f"v1/{path.relative_to(FIXTURE).as_posix()}")
    dest = f"s3://{name}/v1/emb/"
    before = {
        o["Key"]: o["ETag"]
        for o in s3.list_objects_v2(Bucket=name, Prefix="v1/emb/")["Contents"]
        if o["Key"].endswith(".parquet")
    }
    config = tiny_s3_config(f"s3://{name}/v1/src/", dest, s3_endpoint, batch_size=4)
    summary = embed_dataset(config)
    assert summary["shards_skipped"] == 3 and summary["shards_committed"] == 0
    assert summary["status_counts"] == {"ok": 12}  # counts from the old manifest
    after = {
        o["Key"]: o["ETag"]
        for o in s3.list_objects_v2(Bucket=name, Prefix="v1/emb/")["Contents"]
        if o["Key"].endswith(".parquet") and "/_" not in o["Key"]
    }
    assert after == before  # not one shard file rewritten
    # Migrated: the manifest's entries are now bound to the files in the commit index.
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=name, Prefix="v1/emb/")["Contents"]}
    assert f"v1/emb/{LEGACY_MANIFEST}" not in keys
    sink = config.sink
    index = load_index(sink, listed_versions(sink))
    assert sorted(index.rows) == ["00000", "00001", "00002"]
    assert all(r.file_version for r in all_records(sink))
    # And again, from the index alone.
    again = embed_dataset(config)
    assert again["shards_skipped"] == 3 and again["shards_committed"] == 0
    assert cli(["inspect", dest, "--endpoint-url", s3_endpoint]) == 0
    assert cli(["lineage", dest, "--endpoint-url", s3_endpoint]) == 0
    # A changed output option still redoes every shard of the old table.
    changed = embed_dataset(
        tiny_s3_config(f"s3://{name}/v1/src/", dest, s3_endpoint, batch_size=4, preprocess="fast")
    )
    assert changed["shards_committed"] == 3


def test_fetch_settings_and_the_kind_do_not_force_a_re_encode(tmp_path: Path) -> None:
    """Fingerprints hash what changes the table: not fetch concurrency, timeouts, retries
    or the source kind; yes the compute precision."""
    from clipbatch.pipeline.worker import run_plan
    from clipbatch.plan.planner import plan_shards

    src, dest = tmp_path / "src", tmp_path / "out"
    write_webdataset(src, shards=2, per_shard=2, seed=3, size=32)
    base = {
        "source": {"url": str(src)},
        "sink": {"url": str(dest)},
        "model": {"name": "tiny"},
        "runtime": {"device": "cpu", "batch_size": 4},
    }
    plan = plan_shards(build_config(base))
    run_plan(plan, "first")
    for change in (
        {"source.fetch_concurrency": 3},
        {"source.fetch_timeout_s": 1.5},
        {"source.fetch_retries": 0},
        {"source.kind": "webdataset"},
        {"runtime.batch_size": 2, "runtime.decode_workers": 1, "runtime.task_retries": 7},
    ):
        assert plan_shards(build_config(base, change)).todo == [], change
    for change in ({"runtime.precision": "bf16"}, {"source.fetch_max_bytes": 100}):
        assert len(plan_shards(build_config(base, change)).todo) == 2, change


def test_shard_groups_keep_the_task_runs_of_a_huge_dataset_bounded() -> None:
    from clipbatch_flows.embed import MAX_TASK_RUNS, shard_groups

    from clipbatch.records import ShardSpec

    shards = [
        ShardSpec(f"s3://b/{i:06d}.tar", f"{i:06d}", "webdataset", "v") for i in range(230_000)
    ]
    groups = shard_groups(shards, 0)
    assert len(groups) <= MAX_TASK_RUNS
    assert [s for g in groups for s in g] == shards  # every shard once, in order
    assert len(shard_groups(shards[:1000], 0)) == 1000  # one shard per task run up to 1,000
    assert len(shard_groups(shards[:10], 4)) == math.ceil(10 / 4)


def test_crash_before_the_index_write_is_adopted_once_from_footers(tmp_path: Path) -> None:
    """A run killed after its commits but before its index flush: the next plan reads
    those files' footers once, writes their records, and plans from the index after."""
    from clipbatch.pipeline.worker import run_shard
    from clipbatch.plan.planner import plan_shards

    src, dest = tmp_path / "src", tmp_path / "out"
    write_webdataset(src, shards=3, per_shard=2, seed=4, size=32)
    config = build_config(
        {
            "source": str(src),
            "dest": str(dest),
            "model": "tiny",
            "runtime": {"device": "cpu", "batch_size": 4},
        }
    )
    plan = plan_shards(config)
    for shard in plan.todo:  # committed, never indexed: what a SIGKILL before the flush leaves
        run_shard(shard, plan.config, "killed", plan.fingerprints[shard.name])
    assert not (dest / COMMITS_DIR).exists()
    adopted = plan_shards(config)
    assert adopted.todo == [] and adopted.stats.footer_reads == 3
    again = plan_shards(config)
    assert again.todo == [] and again.stats.footer_reads == 0


def test_slices_split_a_dataset_between_runs_that_share_one_table(
    prefect_harness, tmp_path: Path
) -> None:
    """The backfill's `slices` shape: N child runs, disjoint blocks of shards, one table."""
    from clipbatch_flows.backfill import BackfillConfig, child_label, child_parameters
    from clipbatch_flows.embed import embed_dataset

    from clipbatch.plan.planner import ShardSlice

    spec = BackfillConfig(
        source_template="s3://raw/laion/", dest_template="s3://emb/laion/", slices=3
    )
    children = spec.children()
    assert children == [(None, "0/3"), (None, "1/3"), (None, "2/3")]
    assert child_parameters(spec, None, "1/3")["shard_slice"] == "1/3"
    assert child_label(None, "1/3") == "slice-1-of-3"
    both = BackfillConfig(
        source_template="s3://raw/{date}/",
        dest_template="s3://emb/{date}/",
        partitions=["2026-01-01", "2026-01-02"],
        slices=2,
    )
    assert [child_label(p, s) for p, s in both.children()] == [
        "2026-01-01-slice-0-of-2",
        "2026-01-01-slice-1-of-2",
        "2026-01-02-slice-0-of-2",
        "2026-01-02-slice-1-of-2",
    ]
    with pytest.raises(ValueError, match="no partitions are given"):
        BackfillConfig(source_template="s3://raw/{date}/", dest_template="s3://e/", slices=2)
    names = [f"{i:05d}" for i in range(10)]
    for count in (1, 3, 4, 10, 11):
        parts = [ShardSlice(i, count).take(names) for i in range(count)]
        assert [n for p in parts for n in p] == names  # every shard once, in order

    src, dest = tmp_path / "src", tmp_path / "out"
    write_webdataset(src, shards=5, per_shard=2, seed=8, size=32)
    config = build_config(
        {
            "source": str(src),
            "dest": str(dest),
            "model": "tiny",
            "runtime": {"device": "cpu", "batch_size": 4, "task_retries": 0},
        }
    )
    done = [embed_dataset(config, shard_slice=f"{i}/2") for i in range(2)]
    assert [d["shards_committed"] for d in done] == [2, 3]
    assert sorted(p.name for p in dest.glob("*.parquet")) == [f"{n}.parquet" for n in names[:5]]
    sink = config.sink
    assert sorted(load_index(sink, listed_versions(sink)).rows) == names[:5]
    again = embed_dataset(config)
    assert again["shards_skipped"] == 5 and again["shards_committed"] == 0
