"""clipbatch: embed image+caption datasets with CLIP into Parquet.

The library is plain Python (no Prefect imports). Its seam is
reader -> decode/preprocess -> encode -> write, with typed records between stages.
"""

import warnings
from importlib.metadata import PackageNotFoundError, version

# clip-anytorch imports pkg_resources (we pin setuptools<81 for it); its deprecation
# warning is noise for our users.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

try:
    __version__ = version("clipbatch")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
