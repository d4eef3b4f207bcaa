"""``clipbatch serve``: a table's encoders as a service, search, rows' images, and a page.

- :mod:`.settings`: how it runs (safe by default);
- :mod:`.catalog`: every row of the root, without vectors, held once;
- :mod:`.search`: the kNN index or brute force, with exact filters;
- :mod:`.batching`: dynamic batching of concurrent encode requests;
- :mod:`.images`: rows' source images and thumbnails;
- :mod:`.app`: the FastAPI app (imported only by the ``serve`` command: the CLI imports
  every command module on every run).
"""
