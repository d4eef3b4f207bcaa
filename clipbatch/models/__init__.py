"""Model families behind one backend interface: OpenAI clip, open_clip, transformers.

- :mod:`~clipbatch.models.names`: the model-name grammar.
- :mod:`~clipbatch.models.base`: :class:`ModelBackend`, :class:`ResolvedCheckpoint`,
  :class:`TokenBatch`.
- :mod:`~clipbatch.models.openai`, :mod:`~clipbatch.models.openclip`,
  :mod:`~clipbatch.models.hf`: one module per family (resolve, load, backend).
- :mod:`~clipbatch.models.files`: the cache, sha256s, fetching files and folders.
- :mod:`~clipbatch.models.catalog`: :func:`list_models`, the names each family takes.

Callers use :func:`clipbatch.models.loading.resolve_checkpoint` and
:func:`clipbatch.models.loading.load_model`. Importing this package imports nothing else:
the CLI parses model names without loading torch.
"""
