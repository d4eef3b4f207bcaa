"""clipbatch: embed image+caption datasets with CLIP into Parquet.

The library is plain Python (no Prefect imports). Its seam is
reader -> decode/preprocess -> encode -> write, with typed records between stages
(``ARCHITECTURE.md``). Importing it has no side effects on the process; the settings it
wants where work runs are :func:`clipbatch.settings.apply_process_settings`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("clipbatch")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
