"""Which index a table gets, and when an update must be a rebuild instead (the policy).

**Index.** Cosine similarity, as an inner product over L2-normalised vectors. ``auto``
picks, by the number of vectors N: below ``FLAT_BELOW`` an exact ``Flat`` index (small
tables need nothing faster); up to ``SQ8_ABOVE``, ``IVF{nlist},Flat`` with nlist about
4 sqrt(N) (a power of two) and ``nprobe`` nlist/16 (recall@10 >= 0.95 on clustered
vectors: bench/knn.py); above it ``IVF{nlist},SQ8``, a quarter of the memory. Any FAISS
factory string can be given instead.

**Rebuilds.** An update adds new files and removes gone ones, keeping the trained
quantizer. It rebuilds from scratch instead when the number of vectors has grown more
than ``REBUILD_GROWTH`` times since the quantizer was trained (its lists would be
unbalanced), when the table's model or dimension changed, when a Flat index outgrew
``FLAT_BELOW``, when another factory is asked for, or when asked (``rebuild``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from clipbatch.errors import ConfigError
from clipbatch.knn.store import StoredBuild
from clipbatch.tables.snapshot import Snapshot

FLAT_BELOW = 20_000
SQ8_ABOVE = 5_000_000
REBUILD_GROWTH = 2.0
TRAIN_PER_LIST = 40  # FAISS wants about 39 training points per IVF list, at least
MAX_TRAIN = 200_000
# A build from scratch holds the vectors it reads, up to this, to add them without
# reading the files again; past it, it drops them and reads the files a second time.
HOLD_BYTES = 1 << 30


@dataclass(frozen=True)
class IndexSettings:
    factory: str = "auto"  # "auto", or a FAISS factory string such as "IVF1024,Flat"
    nprobe: int | None = None  # IVF lists searched per query; None: nlist / 16
    rebuild: bool = False  # from scratch, even when an incremental update would do
    # A build from scratch holds up to this many bytes of vectors from its first pass;
    # past it, it reads every file a second time to add them (memory stays bounded).
    hold_bytes: int = HOLD_BYTES


def faiss_module() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise ConfigError("kNN indexes need faiss: pip install 'clipbatch[knn]'") from e
    return faiss


def auto_factory(vectors: int) -> str:
    if vectors < FLAT_BELOW:
        return "Flat"
    nlist = 2 ** round(math.log2(max(16.0, 4 * math.sqrt(vectors))))
    return f"IVF{nlist},{'SQ8' if vectors > SQ8_ABOVE else 'Flat'}"


def default_nprobe(factory: str) -> int:
    nlist = ivf_lists(factory)
    return max(1, nlist // 16) if nlist else 1


def ivf_lists(factory: str) -> int:
    head = factory.split(",", 1)[0]
    return int(head[3:]) if head.startswith("IVF") and head[3:].isdigit() else 0


def rebuild_reasons(current: StoredBuild, snap: Snapshot, settings: IndexSettings) -> list[str]:
    info = current.info
    reasons = []
    if settings.rebuild:
        reasons.append("asked to")
    if settings.factory != "auto" and settings.factory != info.get("factory"):
        reasons.append(f"another factory ({settings.factory})")
    total = sum(f.get("vectors", 0) for f in info["files"])  # an estimate before reading
    now = {f.key for f in snap.files}
    growth = len(now - {f["key"] for f in info["files"]}) / max(1, len(info["files"]))
    trained = info.get("trained_on") if ivf_lists(info.get("factory", "")) else None
    if trained and (1 + growth) * total > REBUILD_GROWTH * trained:
        reasons.append(f"the table grew more than {REBUILD_GROWTH}x since the index was trained")
    if info.get("factory") == "Flat" and settings.factory == "auto":
        expected = (1 + growth) * total
        if expected >= FLAT_BELOW:
            reasons.append(f"about {int(expected):,} vectors: past an exact index")
    return reasons


def with_ids(factory: str) -> str:
    # IVF indexes take ids themselves; a Flat one needs the map (IDMap2 also removes).
    return factory if factory.startswith("IVF") else f"IDMap2,{factory}"
