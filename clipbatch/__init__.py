"""clipbatch: embed image+caption datasets with CLIP into Parquet.

The library is plain Python (no Prefect imports). Its seam is
reader -> decode/preprocess -> encode -> write, with typed records between stages.
"""

import os
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version

# Decode threads share the cores with torch's OpenMP pool. By default, OpenMP threads
# spin after each parallel region, taking CPU the decoders need: on 2 cores, passive
# waiting saved 0.8 s of CPU and about 8% of the wall time over 2,000 images (the tiny
# model). libgomp reads this once, when torch loads it; a value the user set wins.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# clip-anytorch imports pkg_resources (we pin setuptools<81 for it); its deprecation
# warning is noise for our users.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

try:
    __version__ = version("clipbatch")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
