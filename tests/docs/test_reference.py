"""The generated references (docs/reference/) match the code, and drift is caught.

``docs/generate.py`` writes the configuration reference from ``EmbedConfig``'s JSON
schema and the CLI reference from the ``clipbatch`` parsers. A new config field or CLI
option without a regenerated page fails here: run ``python docs/generate.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

from pydantic import Field

from clipbatch.config import EmbedConfig, RuntimeConfig
from tests.paths import REPO


def generator() -> ModuleType:
    """docs/generate.py, loaded from its path (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("docs_generate", REPO / "docs" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_pages_are_current() -> None:
    gen = generator()
    behind = gen.stale(REPO / "docs")
    assert not behind, f"stale: {behind}; run `python docs/generate.py` and commit the pages"
    assert gen.main(["--check"]) == 0


def test_a_changed_schema_or_parser_makes_the_pages_stale(tmp_path: Path) -> None:
    gen = generator()
    flags = gen.run_flags()
    page = gen.config_page(EmbedConfig, flags)
    assert "`runtime.batch_size`" in page and "`source.storage.endpoint_url`" in page

    class WiderRuntime(RuntimeConfig):
        new_knob: int = Field(7, ge=1, description="A field the page does not list yet.")

    class ChangedConfig(EmbedConfig):
        runtime: WiderRuntime = Field(default_factory=WiderRuntime)

    changed = gen.config_page(ChangedConfig, flags)
    assert changed != page and "`runtime.new_knob`" in changed and "`7`" in changed

    parser = gen.cli_parser()
    cli = gen.cli_page(parser)
    assert "## clipbatch run" in cli and "`--retry-failed`" in cli
    gen.subcommands(parser)["run"].add_argument("--new-flag", help="not in the page yet")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.add_parser("newcmd", description="a command the page does not list yet")
    changed_cli = gen.cli_page(parser)
    assert changed_cli != cli
    assert "`--new-flag`" in changed_cli and "## clipbatch newcmd" in changed_cli

    # The check itself: a copy of the pages, one of them stale, is reported as such.
    shutil.copytree(REPO / "docs" / "reference", tmp_path / "reference")
    generated = {gen.CONFIG_PAGE: page, gen.CLI_PAGE: changed_cli}
    assert gen.stale(tmp_path, generated) == [gen.CLI_PAGE]
    (tmp_path / gen.CONFIG_PAGE).unlink()
    assert gen.stale(tmp_path, generated) == [gen.CONFIG_PAGE, gen.CLI_PAGE]
