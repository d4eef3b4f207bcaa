"""Whether OpenLineage is configured, answered without importing its client (0.3 s).

Runs without a transport (most of them) never import ``openlineage``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

DEFAULT_NAMESPACE = "clipbatch"


def transport_configured(environ: Mapping[str, str] | None = None, cwd: str | None = None) -> bool:
    """Whether the user configured a transport; OpenLineage stays off otherwise."""
    env = os.environ if environ is None else environ
    if env.get("OPENLINEAGE_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OPENLINEAGE_URL") or env.get("OPENLINEAGE_CONFIG"):
        return True
    if any(k.startswith("OPENLINEAGE__TRANSPORT") for k in env):
        return True
    candidates = [
        os.path.join(cwd or os.getcwd(), "openlineage.yml"),
        os.path.join(os.path.expanduser("~/.openlineage"), "openlineage.yml"),
    ]
    return any(os.path.isfile(p) for p in candidates)


def namespace(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("OPENLINEAGE_NAMESPACE") or DEFAULT_NAMESPACE
