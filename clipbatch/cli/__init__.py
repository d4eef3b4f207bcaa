"""Library commands of the ``clipbatch`` command line: ``search``, ``inspect``, ``lineage``.

They read tables and need no Prefect. The console script and the commands that start
flows (``run``, ``demo``) live in :mod:`clipbatch_flows.cli`. Only the CLI prints.
"""
