"""Object storage: fsspec filesystems and versions, atomic writes, retries, credentials."""
