"""Where shard tasks run: this process's thread pool, an existing Dask cluster, or Ray.

``config.runtime.task_runner`` picks the engine, so the CLI flag and a deployment
parameter select it the same way. A flow cannot switch its own task runner once it
runs, so for Dask and Ray the flow enters that engine's Prefect task runner itself
(``shard_submitter``) and submits the shard tasks to it; the task runs stay children
of the same flow run (prefect-dask and prefect-ray ship the run context, settings
included, with every task), and planning, manifest and lineage stay in the flow.

GPU slots are claimed only when ``runtime.gpus_per_shard`` asks for them: as the Dask
worker resource ``GPU`` (start workers with ``dask worker ... --resources GPU=1``), or
as Ray's ``num_gpus``. A claim no worker can meet leaves tasks waiting for one, which
is what a GPU pool that is still scaling up needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from prefect import Task
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner
from prefect.utilities.callables import get_call_parameters

from clipbatch.config import RuntimeConfig
from clipbatch.errors import ConfigError

EngineKind = Literal["threads", "dask", "ray"]
GPU_RESOURCE = "GPU"  # the Dask worker resource name docs/operations.md tells workers to advertise


@dataclass(frozen=True)
class RunnerSpec:
    """A parsed ``--task-runner`` value."""

    kind: EngineKind
    address: str | None = None


def parse_task_runner(value: str | None) -> RunnerSpec:
    """``None``/``threads`` -> this process; ``dask://h:p`` -> tcp://h:p; ``ray://h:p`` as is."""
    if value in (None, "", "threads"):
        return RunnerSpec("threads")
    scheme, sep, rest = value.partition("://")
    if not sep or not rest or scheme not in ("dask", "ray"):
        raise ConfigError(
            f"task runner {value!r} is not understood: use 'threads', 'dask://host:8786' "
            "or 'ray://host:10001'"
        )
    if scheme == "dask":
        # The Dask scheduler speaks tcp://; dask:// only names the engine for the user.
        return RunnerSpec("dask", f"tcp://{rest}")
    return RunnerSpec("ray", value)


def make_task_runner(spec: RunnerSpec) -> TaskRunner:
    """A Prefect task runner for a Dask or Ray cluster that already runs at ``spec.address``."""
    if spec.kind == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=spec.address)
    if spec.kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as e:
            raise ConfigError(
                "task runner ray:// needs prefect-ray and ray: pip install prefect-ray ray"
            ) from e
        return RayTaskRunner(address=spec.address)
    raise ValueError(f"{spec.kind} runs on the flow's own task runner")


def claim_context(kind: EngineKind, gpus: float) -> contextlib.AbstractContextManager[Any]:
    """The engine's way to make the task submitted inside claim ``gpus`` GPU slots."""
    if gpus <= 0 or kind == "threads":
        return contextlib.nullcontext()
    if kind == "dask":
        import dask

        return dask.annotate(resources={GPU_RESOURCE: gpus})
    from prefect_ray.context import remote_options

    # Ray retires a GPU task's worker process after one call by default (max_calls=1),
    # which would reload the model for every shard; 0 keeps the process and its model.
    return remote_options(num_gpus=gpus, max_calls=0)


class ShardSubmitter:
    """``submit`` like ``Task.submit``, to the engine the config picked."""

    def __init__(
        self, task: Task[..., Any], kind: EngineKind, runner: TaskRunner | None, gpus: float
    ):
        self.task = task
        self.kind = kind
        self.runner = runner
        self.gpus = gpus

    def submit(self, *args: Any, **kwargs: Any) -> PrefectFuture[Any]:
        if self.runner is None:
            return self.task.submit(*args, **kwargs)  # the flow's own thread pool
        parameters = get_call_parameters(self.task.fn, args, kwargs)
        with claim_context(self.kind, self.gpus):
            return self.runner.submit(self.task, parameters)


@contextlib.contextmanager
def shard_submitter(task: Task[..., Any], runtime: RuntimeConfig) -> Iterator[ShardSubmitter]:
    """Enter the engine ``runtime.task_runner`` names for the duration of the shard phase."""
    spec = parse_task_runner(runtime.task_runner)
    if spec.kind == "threads":
        if runtime.gpus_per_shard > 0:
            raise ConfigError(
                "gpus_per_shard claims GPU slots on a Dask or Ray cluster; with the local "
                "thread pool, bound GPU work with shard_concurrency instead"
            )
        yield ShardSubmitter(task, "threads", None, 0.0)
        return
    with make_task_runner(spec) as runner:
        yield ShardSubmitter(task, spec.kind, runner, runtime.gpus_per_shard)
