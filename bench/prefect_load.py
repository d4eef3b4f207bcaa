"""Prefect server load (``python -m bench.prefect_load``): a backfill's fan-out and the
index builds it triggers, against a server on PostgreSQL and on SQLite.

The deployments of deployments/prefect.yaml on a real ``prefect server start`` (the
tests' helper, tests/prefect_server.py), a process worker (``--limit``) and the work
pools of deployments/setup-work-pools.sh (the ``default`` queue's limit = the backfill's
concurrency). One ``embed-backfill`` run over N nightly partitions (a date range, URL
templates, ``max_concurrent_runs``: the deployment's form), each child an
``embed-adhoc`` run on a tiny dataset (1 shard x 4 images, the built-in ``tiny`` model,
device cpu) writing ``root/date=…/``, and each child's completion starting a
``build-index`` run through the deployment's trigger. Local folders stand in for the
object store.

Checks: every partition written once (one file, every key once), every index build
COMPLETED and the final index holding N x 4 vectors, and no 503 from the server on
PostgreSQL (the server logs each one: PREFECT_SERVER_LOG_RETRYABLE_ERRORS). Figures: wall
time, flow runs, 503s and 500s, failed runs, peak server RSS (and the PostgreSQL
cluster's PSS). PostgreSQL is a fresh durable cluster (tests/postgres.py, fsync on) from
Debian's ``postgresql``, as the ``postgres`` user. Writes bench/prefect_load.json and the
prefect-load section of bench/RESULTS.md (one database at a time keeps the other's
figures).

    python -m bench.prefect_load                       # both, 50 partitions, 8 at a time
    python -m bench.prefect_load --database sqlite --partitions 20
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pyarrow.parquet as pq

from bench.common import work_dir
from bench.report import write_figures, write_section
from clipbatch.synthetic import write_webdataset
from tests.postgres import PostgresCluster, start_cluster
from tests.prefect_server import PREFECT, PrefectServer, prefect_server, stop

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
JSON = HERE / "prefect_load.json"
POOL = "clipbatch-local"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
FIRST_DAY = dt.date(2026, 1, 1)
STALL = 120  # seconds with no new index run, every one final: the rest never comes
DATABASES = ("postgresql", "sqlite")
DEPLOYMENTS = ("embed-adhoc", "embed-backfill", "build-index")


class Counting503(httpx.HTTPTransport):
    """The bench's own client: counts 503s and retries them, as Prefect's client does."""

    def __init__(self) -> None:
        super().__init__()
        self.busy = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(10):
            response = super().handle_request(request)
            if response.status_code != 503 or attempt == 9:
                return response
            self.busy += 1
            response.read()
            response.close()
            time.sleep(min(0.25 * 2**attempt, 5))
        raise AssertionError("unreachable")


class Sampler(threading.Thread):
    """Peak RSS of the server process, PSS of the PostgreSQL cluster, and the most
    flow-run processes the worker had at once; every half second."""

    def __init__(self, server_pid: int, postmaster_pid: int | None) -> None:
        super().__init__(daemon=True)
        self.server = psutil.Process(server_pid)
        self.postmaster = psutil.Process(postmaster_pid) if postmaster_pid else None
        self.worker: psutil.Process | None = None
        self.server_rss = 0
        self.db_pss = 0
        self.flow_processes = 0
        self.loads: list[float] = []  # the 1-minute load average, every 10 s
        self.halt = threading.Event()

    def run(self) -> None:
        tick = 0
        while not self.halt.wait(0.5):
            tick += 1
            if tick % 20 == 1:
                self.loads.append(os.getloadavg()[0])
            with contextlib.suppress(psutil.Error):
                tree = [self.server, *self.server.children(recursive=True)]
                self.server_rss = max(self.server_rss, sum(_rss(p) for p in tree))
            if self.postmaster is not None:
                with contextlib.suppress(psutil.Error):
                    tree = [self.postmaster, *self.postmaster.children()]
                    self.db_pss = max(self.db_pss, sum(_pss(p) for p in tree))
            if self.worker is not None:
                with contextlib.suppress(psutil.Error):
                    self.flow_processes = max(self.flow_processes, len(self.worker.children()))


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except psutil.Error:
        return 0


def _pss(p: psutil.Process) -> int:
    try:
        return p.memory_full_info().pss
    except (psutil.Error, AttributeError):
        return _rss(p)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": model or platform.processor(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "prefect": _version("prefect"),
        "platform": platform.platform(),
    }


def _version(package: str) -> str:
    from importlib.metadata import version

    try:
        return version(package)
    except Exception:
        return "?"


def days(n: int) -> list[str]:
    return [(FIRST_DAY + dt.timedelta(days=i)).isoformat() for i in range(n)]


def write_sources(raw: Path, dates: list[str]) -> None:
    for i, day in enumerate(dates):
        write_webdataset(raw / day, shards=1, per_shard=4, seed=1000 + i, size=48)


def backfill_spec(raw: Path, emb: Path, dates: list[str], concurrency: int) -> dict[str, Any]:
    """The embed-backfill deployment's form: a date range, URL templates, the model and
    options of each child, and how many children at once."""
    return {
        "source_template": f"{raw}/{{date}}/",
        "dest_template": f"{emb}/date={{date}}/",
        "start_date": dates[0],
        "end_date": dates[-1],
        "model": {"name": "tiny"},
        "runtime": {"device": "cpu", "batch_size": 8, "task_retries": 0},
        "max_concurrent_runs": concurrency,
        "poll_seconds": 2,
    }


class Api:
    def __init__(self, api: str) -> None:
        self.transport = Counting503()
        self.http = httpx.Client(base_url=api, timeout=60, transport=self.transport)

    def deployment(self, name: str) -> dict[str, Any]:
        r = self.http.get(f"/deployments/name/{name}")
        r.raise_for_status()
        return r.json()

    def flow_run(self, run_id: str) -> dict[str, Any]:
        r = self.http.get(f"/flow_runs/{run_id}")
        r.raise_for_status()
        return r.json()

    def flow_runs(self, **flt: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            r = self.http.post("/flow_runs/filter", json={**flt, "limit": 200, "offset": len(out)})
            r.raise_for_status()
            page = r.json()
            out += page
            if len(page) < 200:
                return out


def _cli(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    proc = subprocess.run(
        [*PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@contextlib.contextmanager
def database(kind: str, home: Path) -> Iterator[tuple[str, PostgresCluster | None]]:
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{home}/prefect.db", None
        return
    cluster = start_cluster(durable=True)
    try:
        yield cluster.url(cluster.createdb("prefect")), cluster
    finally:
        cluster.stop()


def measure(kind: str, partitions: int, concurrency: int, limit: int, timeout: float) -> dict:
    work = work_dir() / f"prefect-load-{kind}"
    shutil.rmtree(work, ignore_errors=True)
    raw, emb, home = work / "raw", work / "emb", work / "home"
    dates = days(partitions)
    write_sources(raw, dates)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    print(f"[{kind}] {partitions} partitions, {concurrency} at a time, worker --limit {limit}; "
          f"load {load_at_start}", flush=True)  # fmt: skip
    result: dict[str, Any] = {
        "database": kind,
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_at_start": load_at_start,
    }
    t_setup = time.monotonic()
    with (
        database(kind, home) as (url, cluster),
        prefect_server(home, database=url, PYTHONPATH=str(ROOT)) as server,
    ):
        if cluster is not None:
            result["postgresql"] = cluster.version
        sampler = Sampler(server.process.pid, cluster.postmaster_pid() if cluster else None)
        sampler.start()
        env = server.env
        setup = subprocess.run(
            ["bash", "deployments/setup-work-pools.sh"],
            env={**env, "GPU_SLOTS": str(concurrency),
                 "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"},
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if setup.returncode != 0:
            raise RuntimeError(setup.stdout + setup.stderr)
        with (home / "worker.log").open("w") as wlog:
            worker = subprocess.Popen(
                [*PREFECT, "worker", "start", "--pool", POOL, "--limit", str(limit)],
                env=env, cwd=ROOT, stdout=wlog, stderr=subprocess.STDOUT,
            )  # fmt: skip
            sampler.worker = psutil.Process(worker.pid)
            try:
                # Only the deployments under test: the file's others (score, curate, …)
                # would add trigger runs of their own, another load on each database.
                names = [a for d in DEPLOYMENTS for a in ("-n", d)]
                _cli(env, "deploy", "--prefect-file", "deployments/prefect.yaml", *names)
                result["setup_s"] = round(time.monotonic() - t_setup, 1)
                result.update(run_backfill(server, raw, emb, dates, concurrency, timeout))
            finally:
                stop(worker)
                sampler.halt.set()
                sampler.join()
        result["server_503"] = server.busy_answers()
        result["server_500"] = server.error_answers()
        result["peak_server_rss_mib"] = round(sampler.server_rss / 2**20, 1)
        result["peak_db_pss_mib"] = round(sampler.db_pss / 2**20, 1) if cluster else None
        result["peak_flow_processes"] = sampler.flow_processes
        result["load_mean_during"] = round(sum(sampler.loads) / max(len(sampler.loads), 1), 2)
        result["log"] = str(home)
    result.update(check_outputs(emb, dates))
    result["ok"] = bool(
        result.get("finished")
        and result["partitions_ok"]
        and result["index_ok"]
        and result["children_completed"] == partitions
        and result["index_runs_completed"] == result["index_runs"] > 0
        and (kind == "sqlite" or result["server_503"] == 0)
    )
    print(f"[{kind}] {json.dumps(result)}", flush=True)
    return result


def run_backfill(
    server: PrefectServer, raw: Path, emb: Path, dates: list[str], concurrency: int, timeout: float
) -> dict[str, Any]:
    api = Api(server.api)
    backfill = api.deployment("embed-backfill/embed-backfill")
    index = api.deployment("build-index/build-index")["id"]
    adhoc = api.deployment("embed-dataset/embed-adhoc")["id"]
    spec = backfill_spec(raw, emb, dates, concurrency)
    t0 = time.monotonic()
    deadline = t0 + timeout
    r = api.http.post(
        f"/deployments/{backfill['id']}/create_flow_run", json={"parameters": {"spec": spec}}
    )
    r.raise_for_status()
    parent_id = r.json()["id"]
    parent: dict[str, Any] = {}
    out: dict[str, Any] = {"finished": False}
    while time.monotonic() < deadline:
        parent = api.flow_run(parent_id)
        if parent["state_type"] in FINAL:
            break
        time.sleep(2)
    out["backfill_state"] = parent.get("state_type")
    out["backfill_s"] = round(time.monotonic() - t0, 1)
    print(f"  backfill {out['backfill_state']} after {out['backfill_s']} s", flush=True)
    # The index builds the children's completions triggered: one per completed child,
    # all final. A lost trigger (or child) shows as a count that stops short: given up
    # after STALL seconds with every run final and none new.
    done = api.flow_runs(
        deployments={"id": {"any_": [adhoc]}},
        flow_runs={"state": {"type": {"any_": ["COMPLETED"]}}},
    )
    expected = len(done)
    out["index_runs_expected"] = expected
    index_runs: list[dict[str, Any]] = []
    quiet_since = None
    seen = -1
    while time.monotonic() < deadline:
        index_runs = api.flow_runs(deployments={"id": {"any_": [index]}})
        settled = all(r["state_type"] in FINAL for r in index_runs)
        if not settled or len(index_runs) != seen:
            quiet_since, seen = None, len(index_runs)
        elif quiet_since is None:
            quiet_since = time.monotonic()
        if quiet_since is not None:
            quiet = time.monotonic() - quiet_since
            if (len(index_runs) >= expected and quiet > 5) or quiet > STALL:
                out["finished"] = len(index_runs) >= expected
                break
        time.sleep(2)
    end = quiet_since or time.monotonic()
    out["wall_s"] = round(end - t0, 1)
    print(f"  {len(index_runs)} index run(s), finished={out['finished']} after "
          f"{out['wall_s']} s", flush=True)  # fmt: skip
    ours = {backfill["id"], adhoc, index}
    every = [r for r in api.flow_runs() if r["deployment_id"] in ours]
    out["deployments"] = sorted(
        d["name"] for d in api.http.post("/deployments/filter", json={}).json()
    )
    children = [r for r in every if r["deployment_id"] == adhoc]
    # The scheduler's upcoming nightly runs (and any other deployment's) are not counted.
    out["flow_runs"] = len(every)
    out["flow_run_states"] = dict(Counter(r["state_type"] for r in every))
    out["children"] = len(children)
    out["children_completed"] = sum(r["state_type"] == "COMPLETED" for r in children)
    out["child_names_unique"] = len({r["name"] for r in children}) == len(children)
    out["index_runs"] = len(index_runs)
    out["index_runs_completed"] = sum(r["state_type"] == "COMPLETED" for r in index_runs)
    out["failed_runs"] = sum(r["state_type"] in ("FAILED", "CRASHED") for r in every)
    out["crashed_runs"] = sum(r["state_type"] == "CRASHED" for r in every)
    runtimes = sorted(r["total_run_time"] for r in children if r["total_run_time"])
    out["child_run_s_median"] = round(runtimes[len(runtimes) // 2], 1) if runtimes else None
    out["client_503"] = api.transport.busy
    return out


def check_outputs(emb: Path, dates: list[str]) -> dict[str, Any]:
    """One file per partition, every key once; the final index holds every vector."""
    bad: list[str] = []
    for day in dates:
        part = emb / f"date={day}"
        files = sorted(p.name for p in part.glob("*.parquet")) if part.is_dir() else []
        if files != ["00000.parquet"]:
            bad.append(f"{day}: files {files}")
            continue
        table = pq.read_table(part / files[0], columns=["key", "status"])
        keys = table.column("key").to_pylist()
        if (
            len(keys) != 4
            or len(set(keys)) != 4
            or set(table.column("status").to_pylist()) != {"ok"}
        ):
            bad.append(f"{day}: keys {keys}")
    out: dict[str, Any] = {"partitions_ok": not bad, "partition_problems": bad[:10]}
    index: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError, KeyError):
        version = json.loads((emb / "_knn/image/CURRENT.json").read_text())["version"]
        index = json.loads((emb / "_knn/image" / version / "build.json").read_text())
    keys = sorted(f["key"] for f in index.get("files", []))
    out["index_vectors"] = index.get("vectors")
    out["index_ok"] = index.get("vectors") == 4 * len(dates) and keys == [
        f"date={d}/00000.parquet" for d in dates
    ]
    return out


def markdown(doc: dict[str, Any]) -> str:
    res = doc["results"]
    kinds = [k for k in DATABASES if k in res]
    m = doc["machine"]
    rows = [
        ("result", lambda r: "**ok**" if r["ok"] else "**FAILED**"),
        ("measured (UTC)", lambda r: r["started"].replace("T", " ")[:16]),
        ("load average at start (1, 5, 15 min)", lambda r: ", ".join(map(str, r["load_at_start"]))),
        ("mean 1-min load during the run", lambda r: r.get("load_mean_during")),
        ("partitions x images", lambda r: f"{r['partitions']} x 4"),
        ("backfill: children at once / worker --limit",
         lambda r: f"{r['concurrency']} / {r['worker_limit']}"),
        ("set-up s (server, pools, deploy)", lambda r: r.get("setup_s")),
        ("backfill s (all children final)", lambda r: r.get("backfill_s")),
        ("wall s (to the last index build)", lambda r: r.get("wall_s")),
        ("flow runs (parent + children + index builds)", lambda r: r.get("flow_runs")),
        ("children COMPLETED", lambda r: f"{r.get('children_completed')} / {r.get('children')}"),
        ("index builds COMPLETED / started / expected",
         lambda r: f"{r.get('index_runs_completed')} / {r.get('index_runs')} / "
                   f"{r.get('index_runs_expected', '-')}"),
        ("median child run s", lambda r: r.get("child_run_s_median")),
        ("final index vectors", lambda r: r.get("index_vectors")),
        ("partitions one file, every key once", lambda r: "yes" if r["partitions_ok"] else "no"),
        ("server 503s (database busy)", lambda r: r.get("server_503")),
        ("server 500s", lambda r: r.get("server_500")),
        ("failed or crashed runs (crashed)",
         lambda r: f"{r.get('failed_runs')} ({r.get('crashed_runs', '-')})"),
        ("peak server RSS MiB", lambda r: r.get("peak_server_rss_mib")),
        ("peak PostgreSQL PSS MiB", lambda r: r.get("peak_db_pss_mib") or "-"),
        ("most flow-run processes at once", lambda r: r.get("peak_flow_processes")),
    ]  # fmt: skip
    lines = [
        f"## Prefect server load: PostgreSQL vs SQLite ({doc['date']})",
        "",
        f"Machine: {m['cpus']} cores ({m['cpu']}), {m['memory_gib']} GiB, Python "
        f"{m['python']}, Prefect {m['prefect']}. `python -m bench.prefect_load`: one "
        "`embed-backfill` run (deployments/prefect.yaml, its form: a date range, URL "
        "templates, `max_concurrent_runs`), each child an `embed-adhoc` run on 1 shard x 4 "
        "images (`tiny`, cpu) writing `root/date=…/` in a local folder, each completion "
        "triggering a `build-index` run; a process worker; every flow run a fresh Python.",
        "",
        "| | " + " | ".join(kinds) + " |",
        "|---|" + "---:|" * len(kinds),
    ]
    for label, get in rows:
        cells = []
        for k in kinds:
            try:
                cells.append(str(get(res[k])))
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for k in kinds:
        if res[k].get("postgresql"):
            lines += ["", f"PostgreSQL: {res[k]['postgresql']}, a fresh durable cluster "
                      "(fsync on) on 127.0.0.1, as the `postgres` user."]  # fmt: skip
    if doc.get("note"):
        lines += ["", doc["note"]]
    return "\n".join(lines) + "\n"


def write(doc: dict[str, Any]) -> None:
    write_figures("prefect_load", doc)
    write_section("prefect-load", markdown(doc))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=[*DATABASES, "both"], default="both")
    parser.add_argument("--partitions", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=8, help="max_concurrent_runs")
    parser.add_argument("--worker-limit", type=int, default=10, help="the worker's --limit")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per database")
    parser.add_argument("--note", default="", help="a line under the table")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    kinds = DATABASES if args.database == "both" else (args.database,)
    doc: dict[str, Any] = {"results": {}}
    if JSON.is_file():
        with contextlib.suppress(ValueError):
            doc = json.loads(JSON.read_text())
    doc.setdefault("results", {})
    for kind in kinds:
        r = measure(kind, args.partitions, args.concurrency, args.worker_limit, args.timeout)
        r.update(partitions=args.partitions, concurrency=args.concurrency,
                 worker_limit=args.worker_limit)  # fmt: skip
        doc["results"][kind] = r
        doc["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        doc["machine"] = machine()
        if args.note:
            doc["note"] = args.note
        if not args.no_write:
            write(doc)
    return 0 if all(doc["results"][k]["ok"] for k in kinds) else 1


if __name__ == "__main__":
    sys.exit(main())
