"""The spec's rules on arrays: each alone and combined, and every reason recorded."""

from __future__ import annotations

import numpy as np
import pytest

from clipbatch.curate.rules import RowJudgements, evaluate, reason_kind
from clipbatch.curate.spec import Rules, load_spec
from clipbatch.errors import ConfigError

NAN = np.nan


def rows() -> RowJudgements:
    return RowJudgements(
        status=np.array(["ok", "ok", "decode_error", "ok", "ok", "ok"], object),
        similarity=np.array([0.31, 0.20, NAN, 0.29, 0.35, 0.30], np.float32),
        scores={
            "aesthetic-laion-v2": np.array([6.0, 7.0, NAN, 4.0, 5.5, 6.5], np.float32),
            "nsfw-laion-l14": np.array([0.1, 0.0, NAN, 0.1, 0.9, 0.05], np.float32),
        },
        group=np.array(["t/a", "t/b", None, "t/d", "t/e", "t/a"], object),
        rank=np.array([0, 0, -1, 0, 0, 1], np.int32),
    )


@pytest.mark.parametrize(
    ("rules", "kept", "why"),
    [
        (Rules(min_similarity=None), [0, 1, 3, 4, 5], {2: ["status: decode_error"]}),
        (
            Rules(status_ok=False, min_similarity=0.28),
            [0, 3, 4, 5],
            {1: ["similarity: 0.200 < 0.28"], 2: ["similarity: no similarity"]},
        ),
        (
            Rules(status_ok=False, min_similarity=None, scores={"aesthetic-laion-v2": {"min": 5}}),
            [0, 1, 4, 5],
            {2: ["aesthetic-laion-v2: no score"], 3: ["aesthetic-laion-v2: 4 < 5"]},
        ),
        (
            Rules(status_ok=False, min_similarity=None, scores={"nsfw-laion-l14": {"max": 0.5}}),
            [0, 1, 3, 5],
            {2: ["nsfw-laion-l14: no score"], 4: ["nsfw-laion-l14: 0.9 > 0.5"]},
        ),
        (
            Rules(status_ok=False, min_similarity=None, unique=0.05),
            [0, 1, 2, 3, 4],
            {5: ["duplicate: of t/a"]},
        ),
        (  # LAION-style, everything at once: each row keeps every reason
            Rules(
                min_similarity=0.28,
                scores={"aesthetic-laion-v2": {"min": 5}, "nsfw-laion-l14": {"max": 0.5}},
                unique=0.05,
            ),
            [0],
            {
                1: ["similarity: 0.200 < 0.28"],
                2: [
                    "status: decode_error",
                    "similarity: no similarity",
                    "aesthetic-laion-v2: no score",
                    "nsfw-laion-l14: no score",
                ],
                3: ["aesthetic-laion-v2: 4 < 5"],
                4: ["nsfw-laion-l14: 0.9 > 0.5"],
                5: ["duplicate: of t/a"],
            },
        ),
    ],
)
def test_each_rule_alone_and_combined(rules: Rules, kept: list[int], why: dict) -> None:
    keep, reasons = evaluate(rules, rows())
    assert np.flatnonzero(keep).tolist() == kept
    for i in range(6):
        assert reasons[i] == why.get(i, []), i


def test_a_score_rule_needs_a_bound_and_a_spec_says_where_it_is_wrong() -> None:
    with pytest.raises(ConfigError, match="rules.scores.q: Value error, give min, max or both"):
        load_spec({"name": "x", "rules": {"scores": {"q": {}}}, "output": {"url": "/o"}})
    with pytest.raises(ConfigError, match="min 2.0 is above max 1.0"):
        load_spec(
            {"name": "x", "rules": {"scores": {"q": {"min": 2, "max": 1}}}, "output": {"url": "/o"}}
        )
    with pytest.raises(ConfigError, match="name"):
        load_spec({"name": "../up", "output": {"url": "/o"}})
    with pytest.raises(ConfigError, match="output"):
        load_spec({"name": "x"})


def test_a_specs_identity_is_its_rules_and_output() -> None:
    base = {"name": "x", "rules": {"min_similarity": 0.28}, "output": {"url": "/o"}}
    spec = load_spec(base)
    assert spec.identity() == load_spec({**base, "heads": {"q": "q.json"}}).identity()
    assert (
        spec.identity()
        == load_spec({**base, "output": {"url": "/o", "rows_per_shard": 5}}).identity()
    )
    assert spec.identity() != load_spec({**base, "rules": {"min_similarity": 0.3}}).identity()
    assert spec.identity() != load_spec({**base, "output": {"url": "/p"}}).identity()
    assert reason_kind("aesthetic-laion-v2: 4 < 5") == "aesthetic-laion-v2"
    assert spec.rules.grouping is None and Rules(unique=0.05).grouping == "semdedup-0.05"
