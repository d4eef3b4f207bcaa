"""The config model: YAML, CLI flags and shorthand all give the same validated EmbedConfig."""

from __future__ import annotations

import pytest
from clipbatch_flows.cli.main import build_parser
from clipbatch_flows.cli.run import config_from_args

from clipbatch.config import EmbedConfig, build_config, load_config
from clipbatch.errors import ConfigError


def test_yaml_and_flags_agree(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "source: s3://bucket/laion/\n"
        "dest: s3://bucket/emb/\n"
        "model: {name: ViT-B/32, max_caption_tokens: 77}\n"
        "runtime: {device: auto, batch_size: 256}\n"
    )
    from_yaml = load_config(yaml_file)
    args = build_parser().parse_args(
        [
            "run",
            "--source",
            "s3://bucket/laion/",
            "--dest",
            "s3://bucket/emb/",
            "--model",
            "ViT-B/32",
            "--device",
            "auto",
            "--batch-size",
            "256",
            "--set",
            "model.max_caption_tokens=77",
        ]
    )
    assert config_from_args(args) == from_yaml
    assert from_yaml.model.max_caption_tokens == 77  # the services' caption limit, from config
    # Unset, the limit is the model family's own context length (77 for CLIP, 64 for SigLIP).
    assert (
        EmbedConfig.model_validate(
            {"source": "s3://b/x/", "dest": "s3://b/y/"}
        ).model.max_caption_tokens
        is None
    )
    # Flags override the file.
    args = build_parser().parse_args(
        ["run", "--config", str(yaml_file), "--batch-size", "32", "--set", "sink.dtype=float32"]
    )
    cfg = config_from_args(args)
    assert cfg.runtime.batch_size == 32 and cfg.sink.dtype == "float32"
    assert cfg.source.url == "s3://bucket/laion/"


def test_invalid_values_fail_with_a_readable_message():
    with pytest.raises(ConfigError, match="batch_size"):
        build_config({"source": "x", "dest": "y", "runtime": {"batch_size": 0}})
    with pytest.raises(ConfigError, match="max_caption_tokens"):
        build_config({"source": "x", "dest": "y", "model": {"max_caption_tokens": 1}})
    with pytest.raises(ConfigError, match="look like credentials"):
        build_config(
            {"source": {"url": "s3://b/", "storage": {"extra": {"secret": "s"}}}, "dest": "y"}
        )


def test_config_is_frozen_and_json_round_trips():
    cfg = build_config({"source": "s3://b/laion/", "dest": "s3://b/emb/"})
    assert EmbedConfig.model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(ValueError):
        cfg.runtime.batch_size = 3  # type: ignore[misc]


def test_cli_without_source_says_what_to_do():
    args = build_parser().parse_args(["run"])
    with pytest.raises(ConfigError, match="--source and --dest"):
        config_from_args(args)


def test_the_source_kinds_are_the_readers_plus_auto() -> None:
    from typing import get_args

    from clipbatch.config import SourceKind
    from clipbatch.sources.registry import READERS

    assert get_args(SourceKind) == ("auto", *READERS)
    for kind, reader in READERS.items():
        assert reader.kind == kind


def test_the_cli_takes_its_choices_from_the_config() -> None:
    from typing import get_args

    from clipbatch.config import EmbeddingDtype, Precision, PreprocessMode, SourceKind

    choices = {
        a.dest: tuple(a.choices)
        for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions
        if a.choices
    }
    assert choices["source_kind"] == get_args(SourceKind)
    assert choices["precision"] == get_args(Precision)
    assert choices["preprocess"] == get_args(PreprocessMode)
    assert choices["dtype"] == get_args(EmbeddingDtype)
