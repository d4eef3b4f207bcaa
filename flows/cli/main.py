"""Argument parsing and dispatch; each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from clipbatch import __version__
from clipbatch.errors import ClipbatchError, RunStopped

INTERRUPTED = 130  # 128 + SIGINT, as shells report it
STOPPED_BY_SIGNAL = 143  # 128 + SIGTERM

# Each entry: (module, help). A module exposes add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("clipbatch_flows.cli.demo", "embed a built-in synthetic dataset offline, end to end"),
    "run": ("clipbatch_flows.cli.run", "embed a dataset (S3, any fsspec URL, or a local path)"),
    "deploy": ("clipbatch_flows.cli.deploy", "register the deployments with a Prefect server"),
    "models": ("clipbatch.cli.models", "list the model names clipbatch takes, by family"),
    "export": (
        "clipbatch.cli.export",
        "write a table in clip-retrieval's layout (npy + metadata) for autofaiss and clip back",
    ),
    "serve": ("clipbatch.cli.serve", "serve a table: encoders, search and a page, over HTTP"),
    "search": ("clipbatch.cli.search", "text->image search over an output table"),
    "index": ("clipbatch.cli.index", "build or update the kNN indexes of a table (_knn/)"),
    "curate": (
        "clipbatch.cli.curate",
        "a training set from a root's judgements: a stable selection and WebDataset shards",
    ),
    "dedup": ("clipbatch.cli.dedup", "near-duplicate pairs from a table's kNN index"),
    "score": (
        "clipbatch.cli.score",
        "score rows with heads (aesthetic, NSFW, yours) and group duplicates (SemDeDup)",
    ),
    "inspect": ("clipbatch.cli.inspect", "validate an output table; non-zero if inconsistent"),
    "lineage": ("clipbatch.cli.lineage", "trace rows to their source versions; exit 1 if stale"),
}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="clipbatch", description="Embed image+caption datasets with CLIP."
    )
    parser.add_argument("--version", action="version", version=f"clipbatch {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show Prefect and library logs"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The temporary local server must not try to phone home from offline machines.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not args.verbose:
        # Users see our summary, not every task-state line; -v brings them back.
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    else:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run: Callable[[argparse.Namespace], int] = args._run
    try:
        return run(args)
    except ClipbatchError as e:
        print(f"clipbatch: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:
            raise
        # A local path this user cannot write (or read): say which, not a traceback.
        where = e.filename2 if e.filename2 is not None else e.filename
        print(f"clipbatch: error: {where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, RunStopped) as e:
        why = "interrupted" if isinstance(e, KeyboardInterrupt) else f"stopped ({e})"
        print(f"clipbatch: {why}; committed shards are kept, rerun to resume", file=sys.stderr)
        return STOPPED_BY_SIGNAL if isinstance(e, RunStopped) else INTERRUPTED


def console_main() -> None:
    """The ``clipbatch`` console script: :func:`main`, then a quick exit."""
    code = main()
    if code in (INTERRUPTED, STOPPED_BY_SIGNAL):
        # Stopped: the children are gone and what was committed is recorded. Shard threads
        # still encoding would hold the exit until their shards end (minutes): don't wait.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    # The interpreter's last act is a full garbage collection over every object that torch,
    # Prefect and pydantic created: about 1.5 s of a 10 s CLI run on 2 cores, to free memory
    # the OS takes back anyway. Freezing skips only that pass; atexit hooks (Prefect's log
    # and event drains, stopping the temporary server) and stream flushes still run, and
    # everything we write is committed by rename before this point.
    import gc

    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console_main()
