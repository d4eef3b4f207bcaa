"""What every benchmark needs to report its figures: the machine, how busy it was, a
timestamped log line, and its section of ``bench/RESULTS.md`` rewritten in place.

Light on purpose (no torch): benchmarks' child processes import it too.

Example::

    from bench.report import log, machine_line, write_section

    log("measuring")                               # [09:12:03] measuring
    write_section("judge", "## Judgements\\n...")  # between <!-- judge:start/end -->
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"


def log(msg: str) -> None:
    """A progress line on stdout, with the time (benchmarks run for minutes)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_line() -> str:
    """``AMD EPYC 7B13, 2 cores available``: the line every section opens with."""
    return f"{cpu_model()}, {cores()} cores available"


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_quiet(limit: float, patience: float, poll: float = 30) -> dict[str, Any]:
    """Wait (up to ``patience`` s) for the 1-minute load average to fall to ``limit``;
    returns what was waited and the load at the start of the measurement."""
    start = time.monotonic()
    while True:
        now, waited = os.getloadavg(), time.monotonic() - start
        if now[0] <= limit or waited >= patience:
            return {
                "load_at_start": [round(x, 2) for x in now],
                "waited_s": round(waited),
                "quiet": now[0] <= limit,
            }
        log(f"load {now[0]:.2f} > {limit}: waiting {poll:.0f} s ({waited:.0f} s so far)")
        time.sleep(poll)


def write_section(name: str, markdown: str, results: Path = RESULTS) -> None:
    """Replace the ``<!-- {name}:start -->`` ... ``<!-- {name}:end -->`` section of
    ``results`` with ``markdown`` (appended when absent). The file is read right before
    it is written: other benchmarks own the other sections."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    text = results.read_text() if results.is_file() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    results.write_text(text)


def write_figures(name: str, figures: dict[str, Any]) -> Path:
    """``bench/{name}.json``: every figure of the last run, for the record."""
    path = HERE / f"{name}.json"
    path.write_text(json.dumps(figures, indent=1, default=str) + "\n")
    return path
