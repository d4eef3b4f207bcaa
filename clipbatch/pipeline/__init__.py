"""The runner: one shard through the stages, and the per-process worker that reuses setup."""
