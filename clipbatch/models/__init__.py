"""Model families behind one backend interface: OpenAI clip, open_clip, transformers.

- :mod:`~clipbatch.models.names`: the model-name grammar.
- :mod:`~clipbatch.models.base`: :class:`ModelBackend`, :class:`ResolvedCheckpoint`,
  :class:`TokenBatch`.
- :mod:`~clipbatch.models.openai`, :mod:`~clipbatch.models.openclip`,
  :mod:`~clipbatch.models.hf`: one module per family (resolve, load, backend).
- :mod:`~clipbatch.models.files`: the cache, sha256s, fetching files and folders.

Callers use :func:`clipbatch.models.loading.resolve_checkpoint` and :func:`clipbatch.models.loading.load_model`.
"""

from clipbatch.models.base import ModelBackend, ResolvedCheckpoint, TokenBatch
from clipbatch.models.names import ModelName, parse_model_name

__all__ = ["ModelBackend", "ModelName", "ResolvedCheckpoint", "TokenBatch", "parse_model_name"]
