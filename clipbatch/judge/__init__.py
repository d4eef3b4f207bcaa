"""Judgements over a table's vectors: heads' scores and SemDeDup's duplicate groups,
incremental, beside the table under ``_scores/``."""
