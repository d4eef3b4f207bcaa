"""Every library function a user calls has a docstring with an example, and the example
is Python whose imports resolve (a renamed function breaks its example's test)."""

from __future__ import annotations

import ast
import importlib
import re
import textwrap

import pytest

# What users call: the README, docs/ and the CLI's modules use these.
PUBLIC_API = [
    "clipbatch.config:build_config",
    "clipbatch.config:load_config",
    "clipbatch.plan.planner:plan_shards",
    "clipbatch.pipeline.worker:run_plan",
    "clipbatch.models.catalog:list_models",
    "clipbatch.models.loading:load_model",
    "clipbatch.tables.table:open_table",
    "clipbatch.tables.table:open_tables",
    "clipbatch.tables.table:find_tables",
    "clipbatch.tables.snapshot:snapshot",
    "clipbatch.tables.vectors:embedding_matrix",
    "clipbatch.tables.export:export_clip_retrieval",
    "clipbatch.query.search:search_root",
    "clipbatch.query.validate:validate",
    "clipbatch.knn.build:build_indexes",
    "clipbatch.knn.build:build_index",
    "clipbatch.knn.search:open_index",
    "clipbatch.lineage.record:read_run_record",
    "clipbatch.heads.registry:list_heads",
    "clipbatch.heads.registry:load_head",
    "clipbatch.judge.score:score_root",
    "clipbatch.judge.semdedup:semdedup_root",
    "clipbatch.curate.spec:load_spec",
    "clipbatch.curate.run:curate_root",
    "clipbatch.serve.app:create_app",
]


def example_of(doc: str) -> str:
    """The indented block after ``Example::`` (or ``>>>`` lines)."""
    match = re.search(r"Example::\n\n((?:[ \t]+.*\n|\n)+)", doc + "\n")
    if match:
        return textwrap.dedent(match.group(1))
    lines = [line.strip()[4:] for line in doc.splitlines() if line.strip().startswith(">>> ")]
    return "\n".join(lines)


@pytest.mark.parametrize("target", PUBLIC_API)
def test_a_public_function_has_an_example_that_parses_and_imports(target: str) -> None:
    module_name, name = target.split(":")
    function = getattr(importlib.import_module(module_name), name)
    example = example_of(function.__doc__ or "")
    assert example.strip(), f"{target}: no example in its docstring"
    tree = ast.parse(example)  # valid Python
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clipbatch"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{target}: {node.module}.{alias.name}"
    assert name in example, f"{target}: its example does not call it"
