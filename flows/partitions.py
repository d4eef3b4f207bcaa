"""Partitions: fill ``{date}``-style placeholders in source/dest URLs.

A nightly deployment keeps URL *templates* such as ``s3://raw/{date}/`` in its
parameters; each run fills them from its scheduled start time, in a named timezone, so
a run that starts late (or is re-run next week) still embeds the night it was scheduled
for. A backfill fills the same templates from an explicit partition value.

Only ``{name}`` placeholders with a known name are replaced: brace patterns such as
``{00000..00099}`` (shard ranges) pass through untouched. The pure functions here have
no Prefect imports; :func:`scheduled_start_time` is the one reader of Prefect's runtime.
"""

from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from clipbatch.errors import ConfigError

# {identifier} — a brace pattern like {00000..00099} or {a,b} never matches.
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
DATE_FIELDS = ("date", "year", "month", "day")
PLACEHOLDERS = ("partition", *DATE_FIELDS)
# A partition value becomes part of an object key; keep it to characters that are safe
# there and cannot climb out of the template's prefix.
_SAFE_PARTITION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=\-]*(/[A-Za-z0-9][A-Za-z0-9._=\-]*)*$")


def placeholders(template: str) -> set[str]:
    """The ``{name}`` placeholders a URL template uses."""
    return set(_PLACEHOLDER.findall(template))


def is_template(url: str) -> bool:
    return bool(placeholders(url))


def check_template(template: str, allowed: tuple[str, ...] = PLACEHOLDERS) -> None:
    """Raise :class:`ConfigError` when ``template`` uses an unknown placeholder."""
    unknown = sorted(placeholders(template) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)} in {template!r}; "
            f"known: {', '.join('{' + a + '}' for a in allowed)}"
        )


def parse_date(value: str) -> dt.date | None:
    """``YYYY-MM-DD`` as a date, or None when ``value`` is not a date."""
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        return None


def partition_values(partition: str | dt.date) -> dict[str, str]:
    """Placeholder values for one partition; date fields only when it is a date."""
    if isinstance(partition, dt.date):
        partition = partition.isoformat()
    if not _SAFE_PARTITION.match(partition) or ".." in partition:
        raise ConfigError(
            f"partition {partition!r} is not a safe path segment "
            "(letters, digits, '.', '_', '=', '-', '/' between segments)"
        )
    values = {"partition": partition}
    day = parse_date(partition)
    if day is not None:
        values.update(
            date=day.isoformat(),
            year=f"{day.year:04d}",
            month=f"{day.month:02d}",
            day=f"{day.day:02d}",
        )
    return values


def fill(template: str, values: dict[str, str]) -> str:
    """Replace known placeholders; a placeholder without a value is a clear error."""
    check_template(template)

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise ConfigError(
                f"{template!r} uses {{{name}}}, but partition {values.get('partition')!r} "
                "is not a date (YYYY-MM-DD); use {partition} instead"
            )
        return values[name]

    return _PLACEHOLDER.sub(sub, template)


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ConfigError(f"unknown timezone {name!r} (use an IANA name like Europe/Berlin)") from e


def partition_for(when: dt.datetime, timezone: str = "UTC", offset_days: int = 0) -> str:
    """The date partition for a scheduled start time, as seen in ``timezone``.

    ``offset_days=-1`` names yesterday's partition: a run scheduled at 00:30 embeds the
    day that just ended. A naive ``when`` is taken as UTC, as Prefect stores it.
    """
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    local = when.astimezone(zone(timezone)).date()
    return (local + dt.timedelta(days=offset_days)).isoformat()


def date_range(start: dt.date, end: dt.date) -> list[str]:
    """Every date from ``start`` to ``end``, both included, as ``YYYY-MM-DD``."""
    days = (end - start).days
    return [(start + dt.timedelta(days=i)).isoformat() for i in range(days + 1)]


def scheduled_start_time() -> dt.datetime | None:
    """This flow run's scheduled start time, from Prefect's runtime (None outside a run)."""
    from prefect.runtime import flow_run

    if not flow_run.get_id():  # outside a run Prefect answers "now", which is no schedule
        return None
    value = flow_run.get_scheduled_start_time()
    if value is None:
        return None
    return dt.datetime.fromisoformat(str(value)) if not isinstance(value, dt.datetime) else value
