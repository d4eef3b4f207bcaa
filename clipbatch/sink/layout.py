"""Where a table's files go (docs/design.md §2): shard files, and per-process staging folders.

``{dest}/{shard}.parquet`` is a committed shard; ``{dest}/_members/{shard}.parquet`` says
where each of its rows' images is in the source; ``{dest}/_tmp/{run}__{host}__{pid}__{token}/``
is one writing process's staging folder (who owns it is in its name, so a later run can
tell a crashed owner's leftovers from a live run's); local shard files are written as
``{tmp}/clipbatch-shard-{pid}-...`` first.
"""

from __future__ import annotations

import os
import socket
import uuid

from clipbatch.io.storage import join

TMP_DIR = "_tmp"
# Where each row's image is in its source (tar member offsets, table references): what a
# server needs to show a row with one ranged read. Bookkeeping beside the table, written
# after its shard file; not part of any fingerprint.
MEMBERS_DIR = "_members"
SEP = "__"
PROCESS_TOKEN = uuid.uuid4().hex[:8]
LOCAL_PREFIX = "clipbatch-shard-"


def output_uri(dest: str, name: str) -> str:
    return join(dest, f"{name}.parquet")


def host_name() -> str:
    return socket.gethostname().replace(SEP, "_").replace("/", "_") or "host"


def staging_id(run_id: str) -> str:
    """This process's staging folder name for ``run_id``: who owns it is in the name."""
    return SEP.join((run_id.replace(SEP, "_"), host_name(), str(os.getpid()), PROCESS_TOKEN))


def members_uri(dest: str, name: str) -> str:
    return join(dest, MEMBERS_DIR, f"{name}.parquet")


def staging_uri(dest: str, run_id: str, name: str) -> str:
    return join(dest, TMP_DIR, staging_id(run_id), f"{name}.parquet")
