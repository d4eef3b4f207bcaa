"""What a run reports where an operator looks, when the index trigger cannot work."""

from __future__ import annotations

from clipbatch.config import build_config
from tests import prefect_readback


def test_trigger_parameters_the_index_flow_refuses_are_logged_and_kept_as_an_artifact(
    prefect_harness, tmp_path
) -> None:
    from clipbatch_flows.reporting import INDEX_TRIGGER_KEY, PrefectReporter
    from prefect import flow
    from prefect.runtime import flow_run

    config = build_config({"source": str(tmp_path), "dest": str(tmp_path / "emb")})

    @flow
    def reporting_flow(storage: dict) -> str:
        PrefectReporter(config, {})._check_index_trigger("s3://b/emb", storage)
        return flow_run.get_id()

    fine = reporting_flow({"credentials_block": "aws-credentials/team"})
    assert not [a for a in prefect_readback.artifacts(fine) if a.key == INDEX_TRIGGER_KEY]

    # What a masked block name used to look like in the event: the build would fail.
    broken = reporting_flow({"credentials_block": "***"})
    [artifact] = [a for a in prefect_readback.artifacts(broken) if a.key == INDEX_TRIGGER_KEY]
    assert "credentials_block" in artifact.data and "s3://b/emb" in artifact.data
    lines = prefect_readback.logs(broken, until="cannot start an index build")
    assert any("cannot start an index build for s3://b/emb" in line for line in lines)
