"""pyproject.toml lists every package the wheel must carry (setuptools takes the list as
given: a package left out is silently missing from the wheel)."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_of_the_tree_is_in_the_wheel_list() -> None:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = tool["package-dir"]
    listed = set(tool["packages"])
    found = set()
    for name, folder in {"clipbatch": "clipbatch", **mapped}.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join([name, *parts]))
    data_only = {"clipbatch.assets", "clipbatch.serve.static"}  # package data, no __init__.py
    assert listed == found | data_only
    for package in data_only:
        assert package in tool["package-data"]
