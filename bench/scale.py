"""Scale: the cost per shard of whole flow runs over 100, 1,000 and 10,000 tiny shards.

``python -m bench.scale [--sizes 100,1000,10000]`` (10,000 shards take a while: run it in
the background). The source and table are on moto's S3 server on 127.0.0.1, behind a
counting proxy; the Prefect API is a temporary server behind a second counting proxy.
Each run is a fresh ``clipbatch``-less child process running ``embed_dataset`` (the
built-in tiny model, 2 images per shard, CPU), so its peak RSS is the flow's own. The
figures, per size:

- marginal overhead per shard: the difference in wall time between two run sizes over
  the difference in shards (start-up cancels out);
- object-store requests and bytes per shard, and commit-index bytes per commit;
- Prefect API requests per shard (task runs, states, logs, events, artifacts);
- the flow process's peak RSS, and its growth per shard.

The results go to bench/RESULTS.md (between the scale markers) and bench/scale.json,
with a projection to 230,000 shards that shows its arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "RESULTS.md"
START, END = "<!-- scale:start -->", "<!-- scale:end -->"
LAION_SHARDS = 230_000
PER_SHARD = 2


def make_source(s3: Any, bucket: str, n: int, work: Path) -> str:
    from clipbatch.synthetic import write_webdataset

    local = work / f"src{n}"
    write_webdataset(local, shards=n, per_shard=PER_SHARD, seed=n, size=32)
    for tar in sorted(local.glob("*.tar")):
        s3.upload_file(str(tar), bucket, f"src{n}/{tar.name}")
    return f"s3://{bucket}/src{n}/"


def child(args: argparse.Namespace) -> int:
    """The flow run, in a process of its own: prints its summary, wall time and peak RSS."""
    import resource

    from clipbatch_flows.embed import embed_dataset

    from clipbatch.config import build_config

    storage = {"endpoint_url": args.endpoint}
    config = build_config(
        {
            "source": {"url": args.source, "storage": storage},
            "sink": {"url": args.dest, "storage": storage},
            "model": {"name": "tiny"},
            "runtime": {"device": "cpu", "batch_size": 8, "decode_workers": 1, "task_retries": 0},
        }
    )
    start = time.perf_counter()
    summary = embed_dataset(config)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary.pop("results", None)
    print(json.dumps({"summary": summary, "seconds": seconds, "peak_rss": peak}))
    return 0


def kind_of(target: str) -> str:
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(target)
    key = unquote(parts.path)
    if any(q in parts.query for q in ("list-type", "delimiter", "prefix=")):
        return "list"
    if "/_commits/" in key:
        return "index"
    if "/_lineage/" in key:
        return "lineage"
    if "/_tmp/" in key:
        return "staging"
    if key.endswith(".tar"):
        return "source"
    if key.endswith(".parquet"):
        return "output"
    return "other"


def measure(sizes: list[int]) -> dict[str, Any]:
    import boto3
    from moto.server import ThreadedMotoServer
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    sys.path.insert(0, str(REPO))
    from tests.faultproxy import FaultProxy

    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PYTHONPATH": str(REPO),
    }
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # nothing leaves 127.0.0.1
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    bucket = f"scale-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    store = FaultProxy(endpoint).start()
    runs: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        api = PREFECT_API_URL.value()
        api_proxy = FaultProxy(api.rsplit("/api", 1)[0]).start()
        env["PREFECT_API_URL"] = f"{api_proxy.url}/api"
        for n in sizes:
            source = make_source(s3, bucket, n, Path(tmp))
            store.exchanges.clear()
            api_proxy.exchanges.clear()
            cmd = [sys.executable, "-m", "bench.scale", "--child", "--source", source]
            cmd += ["--dest", f"s3://{bucket}/emb{n}/", "--endpoint", store.url]
            proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            requests: Counter = Counter()
            nbytes: Counter = Counter()
            for ex in store.exchanges:
                kind = kind_of(ex.target)
                requests[kind] += 1
                nbytes[kind] += ex.sent + ex.received
            committed = out["summary"]["shards_committed"]
            assert committed == n, out["summary"]
            runs[n] = {
                "shards": n,
                "seconds": round(out["seconds"], 2),
                "peak_rss_mib": round(out["peak_rss"] / 2**20, 1),
                "requests": sum(requests.values()),
                "bytes": sum(nbytes.values()),
                "requests_by_kind": dict(requests),
                "bytes_by_kind": dict(nbytes),
                "index_bytes_per_commit": round(nbytes["index"] / committed, 1),
                "prefect_api_requests": len(api_proxy.exchanges),
                "prefect_ws_messages": sum(ex.messages for ex in api_proxy.exchanges),
            }
            print(json.dumps(runs[n]), flush=True)
        api_proxy.stop()
    store.stop()
    server.stop()
    return figures(runs)


def figures(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    sizes = sorted(runs)
    table = []
    for n in sizes:
        r = runs[n]
        table.append(
            {
                "shards": n,
                "wall_s": r["seconds"],
                "requests_per_shard": round(r["requests"] / n, 2),
                "bytes_per_shard": round(r["bytes"] / n),
                "index_bytes_per_commit": r["index_bytes_per_commit"],
                "prefect_api_per_shard": round(r["prefect_api_requests"] / n, 2),
                "prefect_messages_per_shard": round(r["prefect_ws_messages"] / n, 2),
                "peak_rss_mib": r["peak_rss_mib"],
            }
        )
    marginal = []
    for a, b in zip(sizes, sizes[1:], strict=False):
        dt = runs[b]["seconds"] - runs[a]["seconds"]
        drss = (runs[b]["peak_rss_mib"] - runs[a]["peak_rss_mib"]) * 2**20
        marginal.append(
            {
                "between": f"{a}..{b}",
                "ms_per_shard": round(1000 * dt / (b - a), 1),
                "rss_bytes_per_shard": round(drss / (b - a)),
            }
        )
    out: dict[str, Any] = {"runs": runs, "table": table, "marginal": marginal}
    if len(marginal) >= 2:
        first, last = marginal[0]["ms_per_shard"], marginal[-1]["ms_per_shard"]
        out["target"] = {
            "marginal_ratio": round(last / first, 3),
            "met": last <= 1.2 * first,
        }
        out["projection"] = project(runs[sizes[-1]], marginal[-1])
    return out


def project(last: dict[str, Any], marginal: dict[str, Any]) -> dict[str, Any]:
    """230,000 shards, from the largest run's per-shard figures and the last marginal."""
    n = last["shards"]
    per_shard_requests = last["requests"] / n
    per_shard_bytes = last["bytes"] / n
    ms = marginal["ms_per_shard"]
    return {
        "shards": LAION_SHARDS,
        "orchestration_hours_one_worker": round(LAION_SHARDS * ms / 1000 / 3600, 1),
        "object_store_requests": round(LAION_SHARDS * per_shard_requests),
        "object_store_bytes_excluding_data": None,
        "index_bytes": round(LAION_SHARDS * last["index_bytes_per_commit"]),
        "flow_rss_growth_mib": round(LAION_SHARDS * marginal["rss_bytes_per_shard"] / 2**20, 1),
        "arithmetic": (
            f"{LAION_SHARDS:,} x {ms} ms = {LAION_SHARDS * ms / 1000 / 3600:.1f} h of per-shard "
            f"overhead on one worker; {LAION_SHARDS:,} x {per_shard_requests:.2f} requests; "
            f"{LAION_SHARDS:,} x {last['index_bytes_per_commit']} index bytes; "
            f"{LAION_SHARDS:,} x {marginal['rss_bytes_per_shard']} B of flow RSS"
        ),
        "bytes_per_shard_measured": round(per_shard_bytes),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| shards | wall s | requests/shard | bytes/shard | index bytes/commit "
        "| Prefect HTTP/shard | Prefect events/shard | flow peak RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["table"]:
        lines.append(
            f"| {r['shards']:,} | {r['wall_s']} | {r['requests_per_shard']} "
            f"| {r['bytes_per_shard']:,} | {r['index_bytes_per_commit']} "
            f"| {r['prefect_api_per_shard']} | {r['prefect_messages_per_shard']} "
            f"| {r['peak_rss_mib']} |"
        )
    lines += ["", "| between | marginal ms/shard | flow RSS bytes/shard |", "|---|---:|---:|"]
    for m in result["marginal"]:
        lines.append(f"| {m['between']} | {m['ms_per_shard']} | {m['rss_bytes_per_shard']:,} |")
    if "target" in result:
        t = result["target"]
        lines += [
            "",
            f"Target: marginal overhead at the largest size <= 1.2x that at the smallest: "
            f"{t['marginal_ratio']}x, **{'met' if t['met'] else 'missed'}**.",
        ]
    if "projection" in result:
        p = result["projection"]
        lines += ["", f"Projection to {p['shards']:,} shards: {p['arithmetic']}."]
    return "\n".join(lines)


def write_results(result: dict[str, Any]) -> None:
    (Path(__file__).parent / "scale.json").write_text(json.dumps(result, indent=1) + "\n")
    text = RESULTS.read_text() if RESULTS.exists() else ""
    block = f"{START}\n{markdown(result)}\n{END}"
    if START in text and END in text:
        text = text.split(START)[0] + block + text.split(END, 1)[1]
    else:
        text = (
            text.rstrip()
            + "\n\n## Scale: cost per shard from 100 to 10,000 shards\n\n"
            + block
            + "\n"
        )
    RESULTS.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--dest", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    result = measure([int(s) for s in args.sizes.split(",")])
    print(markdown(result))
    if not args.no_write:
        write_results(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
