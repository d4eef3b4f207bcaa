"""``clipbatch models [--family F]``: the model names clipbatch takes, one per line."""

from __future__ import annotations

import argparse

from clipbatch.models.names import FAMILIES, GRAMMAR


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", choices=FAMILIES, help="only this family")


def run(args: argparse.Namespace) -> int:
    from clipbatch.models.catalog import list_models

    for name in list_models(args.family):
        print(name)
    print(f"\n# {GRAMMAR}")
    return 0
