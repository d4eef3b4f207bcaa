"""``clipbatch deploy``: register clipbatch's deployments with the Prefect server.

From any install (a wheel too): the deployments of ``deployments/prefect.yaml`` with
module-path entrypoints, on a process work pool (created when missing). In a checkout,
``prefect deploy --all --prefect-file deployments/prefect.yaml`` does the same with
file-path entrypoints. Needs ``PREFECT_API_URL`` (or a profile naming a server).
"""

from __future__ import annotations

import argparse
import os

from clipbatch.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-n",
        "--name",
        action="append",
        dest="names",
        metavar="NAME",
        help="only this deployment (repeatable), e.g. embed-nightly; default: all",
    )
    p.add_argument(
        "--pool", default="clipbatch-local", help="process work pool (default clipbatch-local)"
    )
    p.add_argument(
        "--gpu-slots",
        type=int,
        default=int(os.environ.get("CLIPBATCH_GPU_SLOTS", "1")),
        help="embedding runs at once: the pool's default queue limit (default 1)",
    )


def run(args: argparse.Namespace) -> int:
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ConfigError(
            "clipbatch deploy registers deployments with a Prefect server: set "
            "PREFECT_API_URL (e.g. http://127.0.0.1:4200/api), or select a profile that names one"
        )
    if args.gpu_slots < 1:
        raise ConfigError("--gpu-slots must be at least 1")
    from clipbatch_flows.deploy import deploy

    for name, deployment_id in deploy(args.names, args.pool, args.gpu_slots):
        print(f"deployed  {name}  ({deployment_id})")
    # The GPU slots, plus one each for a backfill, an index build, a score and a curate run
    # (the control queue's flows), so none of them waits for a GPU run to finish.
    print(f"next:     prefect worker start --pool {args.pool} --limit {args.gpu_slots + 4}")
    return 0
