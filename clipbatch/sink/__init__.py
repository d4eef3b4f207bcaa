"""Stage 4: rows to Parquet, the commit protocol, and the commit index."""
