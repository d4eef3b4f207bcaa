"""``clipbatch serve ROOT``: the table's encoders, search and a page, over HTTP.

ROOT is a table or a partition root, as ``clipbatch search`` takes. Binds 127.0.0.1;
another address needs a bearer token (``--token`` or ``CLIPBATCH_SERVE_TOKEN``).
"""

from __future__ import annotations

import argparse

from clipbatch.cli.common import add_storage_arguments, storage_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="the table or partition root (local path, s3://...)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument(
        "--token", help="bearer token clients must send (default: $CLIPBATCH_SERVE_TOKEN)"
    )
    p.add_argument("--device", default="cpu", help="where queries are encoded (cpu, cuda, auto)")
    p.add_argument(
        "--brute-force", action="store_true", help="search every row even with a kNN index"
    )
    p.add_argument(
        "--allow-networks",
        default="",
        help="networks (CIDR, comma-separated) row image URLs may reach besides the public "
        "internet; the table's own setting is never used",
    )
    p.add_argument("--max-batch", type=int, default=64, help="items per forward pass")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a request waits for others to share its forward pass (0: one each)",
    )
    p.add_argument(
        "--cors-origin", action="append", default=[], help="allow this origin (repeatable)"
    )
    add_storage_arguments(p, "the table and its sources")


def run(args: argparse.Namespace) -> int:
    from clipbatch.serve.settings import ServeSettings

    settings = ServeSettings.from_environment(
        args.root,
        token=args.token,
        storage=storage_options(args),
        host=args.host,
        port=args.port,
        device=args.device,
        use_index=not args.brute_force,
        allow_networks=tuple(n.strip() for n in args.allow_networks.split(",") if n.strip()),
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        cors_origins=tuple(args.cors_origin),
    )
    settings.check()  # before seconds of loading: a refused bind says so at once
    import uvicorn

    from clipbatch.serve.app import create_app

    app = create_app(settings)
    state = app.state.server
    print(
        f"serving {settings.root}: {len(state.search.catalog):,} rows, "
        f"{state.search.method().detail}"
    )
    print(f"page:    http://{settings.host}:{settings.port}/")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    return 0
