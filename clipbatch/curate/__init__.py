"""Curation: a spec's rules over a root's judgements, a stable selection, and curated
WebDataset shards of the kept rows (:func:`clipbatch.curate.run.curate_root`)."""
