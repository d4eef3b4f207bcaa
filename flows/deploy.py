"""Register clipbatch's deployments from an installed package (``clipbatch deploy``).

``prefect deploy --all --prefect-file deployments/prefect.yaml`` serves a checkout and the
image: file-path entrypoints (``flows/embed.py:embed_dataset``) and a pull step that moves
each flow run into the code directory. A wheel install has no such folder, so this
registers the same deployments, read from the same ``prefect.yaml`` (installed as
``clipbatch_deployments``), with module-path entrypoints
(``clipbatch_flows.embed.embed_dataset``) and no pull steps: a process worker in any
folder imports the flows from site-packages. Schedules, parameters, concurrency limits,
queues and triggers are the file's own, so the two ways cannot drift apart.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from clipbatch.errors import ConfigError

log = logging.getLogger(__name__)

DEFINITIONS = ("clipbatch_deployments", "prefect.yaml")
DEFAULT_POOL = "clipbatch-local"
FLOWS_FOLDER = "flows/"  # entrypoints in prefect.yaml are relative to the repository
FLOWS_PACKAGE = "clipbatch_flows"


@dataclass(frozen=True)
class Definition:
    """One deployment of ``prefect.yaml``, resolved to its installed flow."""

    name: str
    flow_name: str
    module: str
    attribute: str
    queue: str | None
    spec: dict[str, Any]


def load_definitions() -> list[dict[str, Any]]:
    """The ``deployments`` of the installed ``prefect.yaml`` (YAML anchors resolved)."""
    text = resources.files(DEFINITIONS[0]).joinpath(DEFINITIONS[1]).read_text()
    return list((yaml.safe_load(text) or {}).get("deployments") or [])


def module_entrypoint(entrypoint: str) -> tuple[str, str]:
    """``flows/embed.py:embed_dataset`` -> (``clipbatch_flows.embed``, ``embed_dataset``)."""
    path, sep, attribute = entrypoint.partition(":")
    if not sep or not path.startswith(FLOWS_FOLDER) or not path.endswith(".py"):
        raise ConfigError(f"entrypoint {entrypoint!r} is not a flow of {FLOWS_FOLDER}")
    module = path[len(FLOWS_FOLDER) : -len(".py")].replace("/", ".")
    return f"{FLOWS_PACKAGE}.{module}", attribute


def definitions(names: list[str] | None = None) -> list[Definition]:
    """The deployments to register: every one, or those named (an unknown name is an error)."""
    out = []
    for spec in load_definitions():
        module, attribute = module_entrypoint(spec["entrypoint"])
        flow = getattr(importlib.import_module(module), attribute)
        pool = spec.get("work_pool") or {}
        out.append(
            Definition(
                spec["name"], flow.name, module, attribute, pool.get("work_queue_name"), spec
            )
        )
    if names:
        known = {d.name for d in out}
        unknown = sorted(set(names) - known)
        if unknown:
            raise ConfigError(f"no deployment named {unknown}; choose from {sorted(known)}")
        out = [d for d in out if d.name in names]
    return out


def runner_deployment(definition: Definition, pool: str) -> Any:
    """The :class:`prefect.deployments.runner.RunnerDeployment` of one definition."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.events import DeploymentTriggerTypes
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType
    from pydantic import TypeAdapter

    spec = definition.spec
    flow = getattr(importlib.import_module(definition.module), definition.attribute)
    schedules = [
        Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
        for s in spec.get("schedules") or []
    ]
    limit = spec.get("concurrency_limit")
    if isinstance(limit, dict):
        limit = ConcurrencyLimitConfig(**limit)
    adapter = TypeAdapter(DeploymentTriggerTypes)
    triggers = [
        adapter.validate_python({"name": f"{definition.name}__automation_{i}", **t})
        for i, t in enumerate(spec.get("triggers") or [], start=1)
    ]
    deployment = flow.to_deployment(
        definition.name,
        description=spec.get("description"),
        tags=spec.get("tags") or [],
        schedules=schedules or None,
        concurrency_limit=limit,
        parameters=spec.get("parameters") or {},
        triggers=triggers or None,
        enforce_parameter_schema=spec.get("enforce_parameter_schema", True),
        work_pool_name=pool,
        work_queue_name=definition.queue,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    # A flow imported under another name (a checkout's `flows.` on sys.path) would store an
    # entrypoint no worker can import.
    expected = f"{definition.module}.{definition.attribute}"
    if deployment.entrypoint != expected:
        raise ConfigError(
            f"{definition.name}: the flow was imported as {deployment.entrypoint!r}, not "
            f"{expected!r}; run `clipbatch deploy` from outside the repository checkout"
        )
    return deployment


def ensure_pool(pool: str, gpu_slots: int) -> None:
    """A process work pool ``pool``; its ``default`` queue runs ``gpu_slots`` embed runs at
    once, and the ``control`` queue (backfills, index builds) is unbounded."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            log.info("created work pool %s", pool)
        except ObjectAlreadyExists:
            pass
        queues = {q.name: q for q in client.read_work_queues(work_pool_name=pool)}
        if "control" not in queues:
            client.create_work_queue(name="control", work_pool_name=pool)
        default = queues.get("default") or client.read_work_queue_by_name("default", pool)
        client.update_work_queue(default.id, concurrency_limit=gpu_slots)


def deploy(
    names: list[str] | None = None, pool: str = DEFAULT_POOL, gpu_slots: int = 1
) -> list[tuple[str, str]]:
    """Register the deployments; returns (``flow/deployment``, id) of each."""
    ensure_pool(pool, gpu_slots)
    out = []
    for definition in definitions(names):
        deployment_id = runner_deployment(definition, pool).apply()
        out.append((f"{definition.flow_name}/{definition.name}", str(deployment_id)))
    return out
