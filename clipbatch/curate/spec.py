"""A curation spec: which rows of a root make the training set, and where it goes.

The spec is YAML, and also the ``curate`` flow's parameter (the Prefect UI renders it
as a form). Every rule is optional; a row is kept when it passes all of them::

    name: laion-style                 # the selection's name: {root}/_curate/laion-style/
    rules:
      status_ok: true                 # only rows whose status is ok
      min_similarity: 0.28            # caption-image cosine (LAION-5B's rule)
      scores:                         # any head's score, by its name under _scores/
        aesthetic-laion-v2: {min: 5.0}
        nsfw-laion-l14: {max: 0.2}
      unique: 0.05                    # one row per SemDeDup group at this eps
    heads:                            # how to compute scores the root lacks (optional)
      aesthetic-laion-v2: aesthetic-laion-v2
      nsfw-laion-l14: nsfw-laion-l14=/models/nsfw-l14.safetensors
    output:
      url: s3://bucket/curated/laion-style/
      rows_per_shard: 10000

A spec's identity is its rules and output URL (:meth:`CurationSpec.identity`): the
selection under its name is bound to it, and a changed spec under the same name is
refused (a new name makes a new selection; the old one is never edited).

Example::

    from clipbatch.curate.spec import load_spec

    spec = load_spec("curate.yaml")
    spec.rules.scores                 # {'aesthetic-laion-v2': ScoreRule(min=5.0, max=None)}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from clipbatch.config import StorageOptions
from clipbatch.errors import ConfigError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ScoreRule(_Model):
    """Bounds on one score; a row without that score (no vector) fails the rule."""

    min: float | None = Field(None, description="Keep rows scored at least this.")
    max: float | None = Field(None, description="Keep rows scored at most this.")

    @model_validator(mode="after")
    def _bounded(self) -> ScoreRule:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class Rules(_Model):
    status_ok: bool = Field(True, description="Only rows whose status is ok.")
    min_similarity: float | None = Field(
        0.28,
        ge=-1,
        le=1,
        description="Caption-image cosine at least this (LAION-5B: 0.28 with ViT-B/32).",
    )
    scores: dict[str, ScoreRule] = Field(
        default_factory=dict,
        description="Bounds on heads' scores, by name (_scores/{name}/), e.g. "
        "aesthetic-laion-v2: {min: 5}.",
    )
    unique: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="One row per duplicate group: SemDeDup's cosine distance eps. A group "
        "is represented by its earliest row; later members are dropped as duplicates.",
    )

    @property
    def grouping(self) -> str | None:
        """The SemDeDup judgement the unique rule reads (``semdedup-{eps}``)."""
        return None if self.unique is None else f"semdedup-{self.unique:g}"


class OutputSpec(_Model):
    url: str = Field(
        description="Where the curated WebDataset shards go (img2dataset's layout): "
        "{url}/00000.tar, 00000.parquet, 00000_stats.json, ..."
    )
    rows_per_shard: int = Field(10_000, ge=1, le=1_000_000, description="At most this many.")
    storage: StorageOptions = Field(default_factory=StorageOptions)


class CurationSpec(_Model):
    name: str = Field(
        pattern=NAME_PATTERN, description="The selection's name: {root}/_curate/{name}/."
    )
    rules: Rules = Field(default_factory=Rules)
    heads: dict[str, str] = Field(
        default_factory=dict,
        description="Scores to compute when the root lacks them: score name -> head "
        "(NAME, NAME=PATH or PATH.json, as `clipbatch score --head` takes).",
    )
    output: OutputSpec

    def identity(self) -> str:
        """sha256 of what the selection is bound to: the rules and the output URL."""
        body = {"rules": self.rules.model_dump(mode="json"), "output": self.output.url}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def judgements(self) -> list[str]:
        """Every judgement the rules read: scores, and the grouping."""
        names = sorted(self.rules.scores)
        return names + ([self.rules.grouping] if self.rules.grouping else [])


def load_spec(source: str | Path | dict[str, Any] | CurationSpec) -> CurationSpec:
    """A spec from a YAML file, a mapping, or a spec; a clear error otherwise.

    Example::

        from clipbatch.curate.spec import load_spec

        spec = load_spec("curate.yaml")
        spec = load_spec({"name": "laion-style", "rules": {"min_similarity": 0.28},
                          "output": {"url": "s3://bucket/curated/"}})
    """
    if isinstance(source, CurationSpec):
        return source
    where = "the curation spec"
    if not isinstance(source, dict):
        where = str(source)
        try:
            source = yaml.safe_load(Path(source).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"curation spec {where}: {e}") from e
        if not isinstance(source, dict):
            raise ConfigError(f"curation spec {where}: expected a mapping, got {source!r}")
    try:
        return CurationSpec.model_validate(source)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"{where}: {problems}") from e
