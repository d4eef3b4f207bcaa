"""Planning: which shards a run encodes and which it skips, and their fingerprints."""
