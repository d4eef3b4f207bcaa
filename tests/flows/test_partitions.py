"""Partition templates, flat parameter overrides and the backfill form: no server needed."""

from __future__ import annotations

import datetime as dt

import pytest
from clipbatch_flows.backfill import BackfillConfig, child_parameters, idempotency_key
from clipbatch_flows.params import resolve_config
from clipbatch_flows.partitions import (
    date_range,
    fill,
    partition_for,
    partition_values,
    scheduled_start_time,
)
from pydantic import ValidationError

from clipbatch.config import build_config
from clipbatch.errors import ConfigError

pytestmark = pytest.mark.timeout(60)


def test_partition_for_reads_the_schedule_in_its_timezone() -> None:
    # 23:30 UTC on Nov 2 is already Nov 3 in Berlin (UTC+1 in winter).
    when = dt.datetime(2026, 11, 2, 23, 30, tzinfo=dt.timezone.utc)
    assert partition_for(when, "UTC") == "2026-11-02"
    assert partition_for(when, "Europe/Berlin") == "2026-11-03"
    assert partition_for(when, "Europe/Berlin", offset_days=-1) == "2026-11-02"
    # Summer time: 22:30 UTC on Jul 1 is 00:30 on Jul 2 in Berlin (UTC+2).
    assert partition_for(dt.datetime(2026, 7, 1, 22, 30), "Europe/Berlin") == "2026-07-02"
    with pytest.raises(ConfigError, match="unknown timezone"):
        partition_for(when, "Mars/Olympus")


def test_fill_replaces_known_placeholders_and_keeps_brace_patterns() -> None:
    values = partition_values("2026-03-09")
    url = "s3://b/raw/{year}/{month}/{day}/{00000..00009}.tar"
    assert fill(url, values) == "s3://b/raw/2026/03/09/{00000..00009}.tar"
    assert fill("s3://b/{partition}/", partition_values("eu/shard=7")) == "s3://b/eu/shard=7/"
    with pytest.raises(ConfigError, match="not a date"):
        fill("s3://b/{date}/", partition_values("eu"))
    with pytest.raises(ConfigError, match=r"unknown placeholder\(s\) \{dat\}"):
        fill("s3://b/{dat}/", values)
    for bad in ("../etc", "a/../b", "/abs", "a b", ""):
        with pytest.raises(ConfigError, match="not a safe path segment"):
            partition_values(bad)


def test_no_scheduled_start_outside_a_flow_run() -> None:
    # Prefect's runtime answers "now" outside a run; that must not pass for a schedule.
    assert scheduled_start_time() is None


def test_date_range_is_inclusive() -> None:
    assert date_range(dt.date(2026, 2, 27), dt.date(2026, 3, 1)) == [
        "2026-02-27",
        "2026-02-28",
        "2026-03-01",
    ]


def test_flat_overrides_and_partition_fill_the_config() -> None:
    base = build_config({"source": "s3://b/raw/{date}/", "dest": "s3://b/emb/date={date}/"})
    when = dt.datetime(2026, 11, 2, 23, 30, tzinfo=dt.timezone.utc)
    run = resolve_config(
        base, {"model": "tiny", "device": "cpu"}, None, "Europe/Berlin", -1, scheduled=when
    )
    assert run.partition == "2026-11-02"
    assert run.config.source.url == "s3://b/raw/2026-11-02/"
    assert run.config.sink.url == "s3://b/emb/date=2026-11-02/"
    assert (run.config.model.name, run.config.runtime.device) == ("tiny", "cpu")
    # An explicit partition wins over the schedule.
    assert resolve_config(base, {}, "2026-01-05", scheduled=when).partition == "2026-01-05"

    alone = resolve_config(None, {"source": "s3://b/x/", "dest": "s3://b/y/", "overwrite": True})
    assert alone.partition is None and alone.config.sink.overwrite is True
    with pytest.raises(ConfigError, match="give either `config`"):
        resolve_config(None, {"source": "s3://b/x/"})
    with pytest.raises(ConfigError, match="no .* placeholder|neither source nor dest"):
        resolve_config(None, {"source": "s3://b/x/", "dest": "s3://b/y/"}, "2026-01-01")
    with pytest.raises(ConfigError, match="runtime.device"):
        resolve_config(base, {"device": "gpu0"}, "2026-01-01")


def _spec(**kw: object) -> BackfillConfig:
    return BackfillConfig(
        source_template="s3://b/raw/{date}/", dest_template="s3://b/emb/{date}/", **kw
    )


def test_backfill_form_validates_and_keys_are_stable() -> None:
    spec = _spec(start_date="2026-10-30", end_date="2026-11-01", model={"name": "tiny"})
    assert spec.partition_list() == ["2026-10-30", "2026-10-31", "2026-11-01"]
    params = child_parameters(spec, "2026-10-31")
    assert params["config"]["source"]["url"] == "s3://b/raw/{date}/"  # the child fills it
    assert params["config"]["model"] == {"name": "tiny"}
    key = idempotency_key(spec, params)
    assert key == idempotency_key(_spec(partitions=["2026-10-31"], model={"name": "tiny"}), params)
    assert key != idempotency_key(spec, child_parameters(spec, "2026-11-01"))
    bumped = spec.model_copy(update={"attempt": 2})
    assert key != idempotency_key(bumped, params)

    cases = {
        "not both": dict(partitions=["2026-01-01"], start_date="2026-01-01", end_date="2026-01-02"),
        "give partitions": {},
        "before start_date": dict(start_date="2026-01-02", end_date="2026-01-01"),
        "more than once": dict(partitions=["a", "a"]),
        "must use {partition}": dict(partitions=["eu", "us"]),
        "less than or equal to 64": dict(partitions=["2026-01-01"], max_concurrent_runs=65),
    }
    for message, kw in cases.items():
        with pytest.raises(ValidationError, match=message):
            _spec(**kw)
    with pytest.raises(ValidationError, match="needs a {date} or {partition}"):
        BackfillConfig(
            source_template="s3://b/raw/{date}/",
            dest_template="s3://b/emb/",
            partitions=["2026-01-01"],
        )
