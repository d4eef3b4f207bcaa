"""What the library's commands share: reaching object storage from a flag."""

from __future__ import annotations

import argparse

from clipbatch.config import StorageOptions


def add_storage_arguments(p: argparse.ArgumentParser, what: str = "the table") -> None:
    """``--endpoint-url``: an S3-compatible endpoint for ``what``."""
    p.add_argument(
        "--endpoint-url",
        help=f"S3-compatible endpoint for {what} (default: the environment, e.g. AWS_ENDPOINT_URL)",
    )


def storage_options(args: argparse.Namespace) -> StorageOptions:
    """The storage options the flags name (credentials come from the environment)."""
    return StorageOptions(endpoint_url=args.endpoint_url)
