"""The ``clipbatch`` command line. Only the CLI prints, and only for the user."""

from clipbatch.cli.main import console_main, main

__all__ = ["console_main", "main"]
