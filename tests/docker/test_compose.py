"""docker/ and the work-pool templates, checked against what the code reads.

There is no Docker engine here, so nothing is built or started: these checks keep the
files correct by construction. Services, ports, volumes and environment names in
docker/compose.yaml must agree with the Dockerfile, the entrypoint, deployments/
prefect.yaml, the settings Prefect knows and the variables botocore and clipbatch read.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from clipbatch.errors import ConfigError
from tests.paths import REPO

pytestmark = pytest.mark.timeout(60)

ROOT = REPO
DOCKER = ROOT / "docker"
DEPLOY = ROOT / "deployments"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> dict[str, Any]:
    """ENV values, ARG names, USER, WORKDIR, FROM, ENTRYPOINT and COPY targets."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    out: dict[str, Any] = {"env": {}, "args": set(), "copy": [], "from": [], "workdir": []}
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ENV":
            out["env"].update(dict(re.findall(r"(\w+)=(\S+)", rest)))
        elif word == "ARG":
            out["args"].add(rest.split("=")[0])
        elif word == "USER":
            out["user"] = rest.strip()
        elif word == "WORKDIR":
            out["workdir"].append(rest.strip())
        elif word == "FROM":
            out["from"].append(rest.strip())
        elif word == "ENTRYPOINT":
            out["entrypoint"] = json.loads(rest)
        elif word == "COPY":
            out["copy"].append(rest.split())
        elif word == "RUN" and "useradd" in rest:
            out["useradd"] = rest
    return out


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _default(value: str) -> str:
    """``${VAR:-default}`` as compose resolves it with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def _code_env_names() -> set[str]:
    """Environment variables our code reads: os.environ in Python, ${VAR} in the
    entrypoint, {{ $VAR }} in prefect.yaml's steps."""
    names: set[str] = set()
    for path in [
        *ROOT.glob("clipbatch/**/*.py"),
        *ROOT.glob("flows/*.py"),
        *ROOT.glob("tasks/*.py"),
    ]:
        names |= set(re.findall(r"environ(?:\.get)?[\(\[]\s*\"([A-Z0-9_]+)\"", path.read_text()))
    names |= set(re.findall(r"\$\{([A-Z0-9_]+)", (DOCKER / "entrypoint.sh").read_text()))
    names |= set(re.findall(r"\{\{\s*\$([A-Z0-9_]+)\s*\}\}", (DEPLOY / "prefect.yaml").read_text()))
    return names


def _botocore_env_names() -> set[str]:
    """The variables botocore reads for credentials, region and the S3 endpoint."""
    from botocore.configprovider import BOTOCORE_DEFAUT_SESSION_VARIABLES
    from botocore.credentials import EnvProvider

    names = {EnvProvider.ACCESS_KEY, EnvProvider.SECRET_KEY, EnvProvider.TOKENS[0]}
    for _, env, *_ in BOTOCORE_DEFAUT_SESSION_VARIABLES.values():
        names |= {env} if isinstance(env, str) else set(env or ())
    # The S3 endpoint variable: ask botocore's own resolver that it reads it.
    from botocore.configprovider import ConfiguredEndpointProvider

    env = {"AWS_ENDPOINT_URL_S3": "http://minio:9000"}
    provider = ConfiguredEndpointProvider({}, {}, "s3", environ=env)
    assert provider.provide() == "http://minio:9000"
    return names | set(env)


def _prefect_setting_names() -> set[str]:
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_settings_fields

    return set(_get_settings_fields(Settings))


def test_services_wire_together(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "prefect-server", "minio", "minio-init", "worker", "serve"}
    pg, server, minio, worker = (
        services[s] for s in ("postgres", "prefect-server", "minio", "worker")
    )

    # Server -> PostgreSQL: same user, password, database; host is the service name.
    db = urlsplit(_default(_env(server)["PREFECT_API_DATABASE_CONNECTION_URL"]))
    pg_env = {k: _default(v) for k, v in _env(pg).items()}
    assert db.scheme == "postgresql+asyncpg" and (db.hostname, db.port) == ("postgres", 5432)
    assert (db.username, db.password, db.path.lstrip("/")) == (
        pg_env["POSTGRES_USER"],
        pg_env["POSTGRES_PASSWORD"],
        pg_env["POSTGRES_DB"],
    )
    assert "postgres" in server["depends_on"]

    # Worker -> server: the API URL names the server service and the port it listens on,
    # which is the published one too.
    api = urlsplit(_env(worker)["PREFECT_API_URL"])
    listen = int(server["command"][server["command"].index("--port") + 1])
    assert (api.hostname, api.port, api.path) == ("prefect-server", listen, "/api")
    assert f"4200:{listen}" in server["ports"][0]
    assert urlsplit(_env(server)["PREFECT_UI_API_URL"]).port == 4200

    # Worker -> MinIO: endpoint on MinIO's S3 port, credentials are MinIO's root user.
    s3 = urlsplit(_env(worker)["AWS_ENDPOINT_URL_S3"])
    minio_port = int(minio["command"][minio["command"].index("--address") + 1].lstrip(":"))
    assert (s3.hostname, s3.port) == ("minio", minio_port)
    assert any(p.endswith(f":{minio_port}") for p in minio["ports"])
    wenv, menv = _env(worker), _env(minio)
    assert wenv["AWS_ACCESS_KEY_ID"] == menv["MINIO_ROOT_USER"]
    assert wenv["AWS_SECRET_ACCESS_KEY"] == menv["MINIO_ROOT_PASSWORD"]
    assert set(worker["depends_on"]) == {"prefect-server", "minio-init"}

    # The bucket minio-init makes is the one the nightly deployment reads and writes.
    init = " ".join(services["minio-init"]["command"])
    assert f"http://minio:{minio_port}" in init
    made = set(re.findall(r"local/([a-z0-9.-]+)", init))
    nightly = _deployment("embed-nightly")["parameters"]["config"]
    used = {urlsplit(nightly[part]["url"]).netloc for part in ("source", "sink")}
    assert used <= made, (used, made)


def test_worker_gpu_reservation_and_volumes(compose: dict[str, Any], dockerfile) -> None:
    worker = compose["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    # Exactly a count of NVIDIA GPUs (not device_ids, not "all"), and nothing else.
    assert set(device) == {"driver", "count", "capabilities"}, device
    assert isinstance(device["count"], int) and device["count"] >= 1
    # Only the worker reserves a GPU: the server, MinIO and one-shot services do not.
    reserving = [
        name
        for name, service in compose["services"].items()
        if (service.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices")
    ]
    assert reserving == ["worker"]
    # One embedding run per reserved GPU, and worker slots to spare for backfill runs,
    # which wait on their children from another queue, and for index builds.
    env = _env(worker)
    assert int(env["CLIPBATCH_GPU_SLOTS"]) == int(device["count"])
    assert int(env["CLIPBATCH_WORKER_LIMIT"]) > int(env["CLIPBATCH_GPU_SLOTS"])
    queues = {d["name"]: d["work_pool"]["work_queue_name"] for d in _prefect_yaml()["deployments"]}
    assert queues == {
        "embed-nightly": "default",
        "embed-adhoc": "default",
        "embed-backfill": "control",
        "build-index": "control",
        "score": "control",
        "curate": "control",
    }
    # A backfill, the index builds, score and curate runs (each deployment's limit) never
    # starve the GPU slots.
    control = sum(
        _deployment(name)["concurrency_limit"]["limit"]
        for name in ("build-index", "score", "curate")
    )
    assert int(env["CLIPBATCH_WORKER_LIMIT"]) >= int(env["CLIPBATCH_GPU_SLOTS"]) + 1 + control
    entry = (DOCKER / "entrypoint.sh").read_text()
    assert 'set-concurrency-limit default "${CLIPBATCH_GPU_SLOTS' in entry

    # Every named volume is declared, and none is left unused.
    used = set()
    for svc in compose["services"].values():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if not source.startswith((".", "/")):
                used.add(source)
    assert used == set(compose["volumes"])

    # The cache volume sits where the image's non-root user keeps clip's and our caches.
    mounts = dict(v.split(":")[:2] for v in worker["volumes"])
    home = re.search(r"--home-dir (\S+)", dockerfile["useradd"]).group(1)
    assert mounts["modelcache"] == f"{home}/.cache"
    assert dockerfile["env"]["CLIPBATCH_CACHE"].startswith(mounts["modelcache"] + "/")
    assert _env(worker)["CLIPBATCH_CACHE"] == dockerfile["env"]["CLIPBATCH_CACHE"]
    assert worker["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / worker["build"]["context"] / worker["build"]["dockerfile"]).is_file()
    assert set(worker["build"].get("args", {})) <= dockerfile["args"]


def test_environment_names_are_ones_the_code_reads(compose: dict[str, Any], dockerfile) -> None:
    known = _code_env_names() | _botocore_env_names() | _prefect_setting_names()
    assert {"CLIPBATCH_HOME", "CLIPBATCH_CACHE", "CLIPBATCH_WORK_POOL"} <= _code_env_names()
    for name in ("worker", "prefect-server"):
        unknown = set(_env(compose["services"][name])) - known
        assert not unknown, f"{name} sets variables nothing reads: {unknown}"
    unknown = set(dockerfile["env"]) - known - {
        "DEBIAN_FRONTEND", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR",
        "PIP_DISABLE_PIP_VERSION_CHECK", "VIRTUAL_ENV", "PATH",
    }  # fmt: skip
    assert not unknown, f"Dockerfile sets variables nothing reads: {unknown}"
    # The pull step's directory is the image's code directory.
    assert dockerfile["env"]["CLIPBATCH_HOME"] in dockerfile["workdir"]


def test_dockerfile_shape(dockerfile) -> None:
    base = dockerfile["from"][-1]
    assert base == "${CUDA_IMAGE}"
    (default,) = re.findall(r"ARG CUDA_IMAGE=(\S+)", (DOCKER / "Dockerfile").read_text())
    assert default.startswith("nvidia/cuda:") and "runtime" in default
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", default).groups()
    (index,) = re.findall(r"ARG TORCH_INDEX_URL=(\S+)", (DOCKER / "Dockerfile").read_text())
    assert index.endswith(f"/cu{cuda[0]}{cuda[1]}"), "torch wheels must match the CUDA base"
    assert {"BAKE_MODELS", "TORCH_INDEX_URL", "UID"} <= dockerfile["args"]
    assert dockerfile["user"] not in ("root", "0")
    assert dockerfile["entrypoint"][-1] == "clipbatch-entrypoint"
    # Everything the deployments' entrypoints and the package need is copied in.
    copied = {c[0] for c in dockerfile["copy"]}
    for entry in ("clipbatch", "flows", "tasks", "deployments", "pyproject.toml"):
        assert entry in copied, entry
    for dep in _prefect_yaml()["deployments"]:
        assert dep["entrypoint"].split("/")[0] in copied


def _prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "prefect.yaml").read_text())


def _deployment(name: str) -> dict[str, Any]:
    (dep,) = [d for d in _prefect_yaml()["deployments"] if d["name"] == name]
    return dep


@pytest.mark.parametrize(
    "name", ["docker-gpu-job-template.json", "kubernetes-gpu-job-template.json"]
)
def test_gpu_job_templates(name: str, dockerfile) -> None:
    template = json.loads((DEPLOY / name).read_text())
    variables = template["variables"]
    jsonschema.Draft202012Validator.check_schema(variables)
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    jsonschema.validate(defaults, variables)  # every default fits its own bounds
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert used == set(variables["properties"]), used ^ set(variables["properties"])
    assert defaults["env"]["CLIPBATCH_HOME"] == dockerfile["env"]["CLIPBATCH_HOME"]
    job = template["job_configuration"]
    # The GPU request itself, exactly, and bound to its variable.
    if name.startswith("docker"):
        # docker-py's DeviceRequest: NVIDIA driver, the chosen device ids, capability gpu.
        assert job["container_create_kwargs"]["device_requests"] == [
            {"driver": "nvidia", "device_ids": "{{ gpu_device_ids }}", "capabilities": [["gpu"]]}
        ]
        ids = variables["properties"]["gpu_device_ids"]
        assert ids["type"] == "array" and ids["minItems"] >= 1 and defaults["gpu_device_ids"]
    else:
        (container,) = job["job_manifest"]["spec"]["template"]["spec"]["containers"]
        resources = container["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
        assert resources["requests"]["nvidia.com/gpu"] == "{{ gpu_count }}"
        count = variables["properties"]["gpu_count"]
        assert count["type"] == "integer" and count["minimum"] >= 1 and defaults["gpu_count"] >= 1
        # Scheduled onto GPU nodes, tolerating their taint.
        assert defaults["node_selector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in defaults[
            "tolerations"
        ]
    if name.startswith("kubernetes"):
        uid = re.search(r"ARG UID=(\d+)", (DOCKER / "Dockerfile").read_text()).group(1)
        pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == int(uid)


def test_the_serve_service_binds_beyond_loopback_only_with_a_token(compose: dict[str, Any]) -> None:
    """`clipbatch serve` in compose binds 0.0.0.0 in its container, so the settings it gets
    must carry a token (or it refuses to start); the host publishes it on loopback only,
    and it reads the nightly tables from MinIO as the worker writes them."""
    from clipbatch.cli.serve import add_arguments
    from clipbatch.serve.settings import ServeSettings

    serve, worker = compose["services"]["serve"], compose["services"]["worker"]
    argv = serve["command"]
    assert argv[:2] == ["clipbatch", "serve"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(argv[2:])
    token = _default(_env(serve)["CLIPBATCH_SERVE_TOKEN"])
    ServeSettings(root=args.root, host=args.host, token=token).check()
    with pytest.raises(ConfigError):
        ServeSettings(root=args.root, host=args.host).check()
    assert serve["ports"] == [f"127.0.0.1:{args.port}:{args.port}"]
    assert _env(serve)["AWS_ENDPOINT_URL_S3"] == _env(worker)["AWS_ENDPOINT_URL_S3"]
    nightly = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    [embed] = [d for d in nightly["deployments"] if d["name"] == "embed-nightly"]
    dest = embed["parameters"]["config"]["sink"]["url"]
    assert dest.startswith(args.root + "/date=")  # the nightly partitions' root
    assert serve["image"] == worker["image"]
