"""Optional dependencies: open_clip and transformers are extras, and a missing one says so."""

from __future__ import annotations

import importlib
from types import ModuleType

from clipbatch.errors import ConfigError

EXTRAS = {
    "open_clip": ("open_clip", "open_clip_torch"),
    "hf": ("transformers", "transformers"),
}


def install_hint(extra: str) -> str:
    return f"pip install 'clipbatch[{extra}]'"


def require(extra: str, model_name: str, module: str | None = None) -> ModuleType:
    """Import the extra's module (or ``module`` of it); a ConfigError naming the pip command.

    ``ModuleNotFoundError`` and a module switched off (``sys.modules[name] = None``) both
    raise ImportError here.
    """
    top, distribution = EXTRAS[extra]
    name = module or top
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ConfigError(
            f"model {model_name!r} needs {distribution} ({name} cannot be imported: {e}); "
            f"install it with: {install_hint(extra)}"
        ) from e
