"""The ``clipbatch`` command line. Only the CLI prints, and only for the user."""

from clipbatch.cli.main import main

__all__ = ["main"]
