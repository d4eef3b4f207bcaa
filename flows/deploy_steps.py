"""Prefect pull steps of clipbatch's deployments (``deployments/prefect.yaml``).

A flow run started by a worker begins in a temporary folder unless a pull step moves it
to the code: without one, it dies with ``FileNotFoundError: .../flows/embed.py``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

HOME_VARIABLE = "CLIPBATCH_HOME"
ENTRYPOINT = Path("flows") / "embed.py"


class CodeDirectoryError(RuntimeError):
    """The flow run cannot find clipbatch's code; the message says what to set."""


def code_directory() -> Path:
    """``$CLIPBATCH_HOME``, else the checkout this package was installed from (editable).

    An editable install maps ``clipbatch_flows`` to the checkout's ``flows/``, so the
    default is the repository root: a local process worker needs nothing set. A wheel
    install has no ``flows/embed.py``: its deployments come from ``clipbatch deploy``
    (module-path entrypoints, no pull step), or CLIPBATCH_HOME names a checkout.
    """
    named = os.environ.get(HOME_VARIABLE, "").strip()
    if named:
        home = Path(named).expanduser()
        if not (home / ENTRYPOINT).is_file():
            raise CodeDirectoryError(
                f"{HOME_VARIABLE}={named!r} does not hold clipbatch's code ({ENTRYPOINT} is "
                f"not there); set {HOME_VARIABLE} to the repository root (or the image's "
                "/opt/clipbatch) in the worker's environment"
            )
        return home
    home = Path(__file__).resolve().parent.parent
    if not (home / ENTRYPOINT).is_file():
        raise CodeDirectoryError(
            f"{HOME_VARIABLE} is not set and clipbatch's code is not beside the installed "
            f"package ({home}); set {HOME_VARIABLE} to the repository root in the worker's "
            "environment, e.g. CLIPBATCH_HOME=$PWD prefect worker start ..., or register "
            "the deployments with `clipbatch deploy`, which needs no code directory"
        )
    return home


def enter_code_directory() -> dict[str, str]:
    """Pull step: change into :func:`code_directory` before the flow's entrypoint loads."""
    home = code_directory()
    os.chdir(home)
    log.info("flow run starts in %s", home)
    return {"directory": str(home)}
