"""The installed wheel, as a user gets it: unambiguous names, the demo, and deployments.

The wheel is built from this checkout and installed with ``--no-deps`` into a fresh venv
that reuses the dev environment's third-party packages (a ``.pth`` naming its
site-packages; the dev venv's editable clipbatch is not active there), so torch is not
downloaded again. Everything runs from a temporary working directory, so the
repository's own folders cannot hide a broken wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from clipbatch.synthetic import write_webdataset
from tests.helpers import read_table
from tests.prefect_server import prefect_server, stop

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Installed:
    venv: Path
    site: Path
    wheel: Path

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: an in-tree build/ folder keeps files of modules since deleted.
    source = out / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        "clipbatch-demo", ".whl",
    ))  # fmt: skip
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = out.glob("clipbatch-*.whl")
    venv = out / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    # The dev environment's packages, without running its .pth files (the editable finder).
    (site / "dev-packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--no-deps", "-q", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    return Installed(venv, site, wheel)


def run(
    installed: Installed, argv: list[str], cwd: Path, env: dict | None = None, timeout: float = 300
):
    environment = {k: v for k, v in (env or os.environ).items() if k not in ("PYTHONPATH",)}
    return subprocess.run(
        argv, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )


def test_the_wheel_installs_only_unambiguous_names(installed: Installed, tmp_path: Path) -> None:
    top = {p.name for p in installed.site.iterdir() if not p.name.endswith((".pth", ".dist-info"))}
    assert {"clipbatch", "clipbatch_flows", "clipbatch_tasks", "clipbatch_deployments"} <= top
    assert not top & {"flows", "tasks", "bench", "tests", "deployments"}, top
    probe = run(installed, [installed.python, "-c", (
        "import importlib.util, json, clipbatch, clipbatch_flows, clipbatch_deployments;"
        "print(json.dumps({'clipbatch': clipbatch.__file__, 'flows': clipbatch_flows.__file__,"
        " 'plain': [n for n in ('flows', 'tasks', 'bench') if importlib.util.find_spec(n)]}))"
    )], tmp_path)  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert found["clipbatch"].startswith(str(installed.site))
    assert found["flows"].startswith(str(installed.site))
    assert found["plain"] == []
    # The package data the wheel must carry: the built-in model and the deployments.
    assert (installed.site / "clipbatch" / "assets" / "tiny-clip.pt").is_file()
    assert (installed.site / "clipbatch_deployments" / "prefect.yaml").is_file()


def test_the_demo_runs_from_the_installed_code(installed: Installed, tmp_path: Path) -> None:
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    proc = run(installed, [installed.bin("clipbatch"), "demo", "--shards", "2", "--per-shard", "8",
                           "--no-progress"], work, env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == "", proc.stderr  # no exit traceback, no Prefect log
    assert "rows:       16 written: 16 ok" in proc.stdout
    table, _ = read_table(str(work / "clipbatch-demo" / "embeddings"))
    assert table.num_rows == 16


@pytest.fixture(scope="module")
def server(installed: Installed, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    home = tmp_path_factory.mktemp("prefect-home")
    with prefect_server(home, installed.python) as s:
        yield s


def test_clipbatch_deploy_registers_deployments_a_worker_runs_from_site_packages(
    installed: Installed, server, tmp_path: Path
) -> None:
    env = {k: v for k, v in server.env.items() if k != "PYTHONPATH"}
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    deploy = run(
        installed, [installed.bin("clipbatch"), "deploy", "--gpu-slots", "2"], elsewhere, env
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    assert deploy.stdout.count("deployed  ") == 6, deploy.stdout
    api = httpx.Client(base_url=server.api, timeout=30)
    deployments = {d["name"]: d for d in api.post("/deployments/filter", json={"limit": 50}).json()}
    assert set(deployments) == {
        "embed-nightly", "embed-adhoc", "embed-backfill", "build-index", "score", "curate"
    }  # fmt: skip
    for d in deployments.values():
        assert d["entrypoint"].startswith("clipbatch_flows."), d["entrypoint"]
        assert not d["pull_steps"]
    nightly = deployments["embed-nightly"]
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["30 0 * * *"]
    assert nightly["work_queue_name"] == "default"
    assert deployments["build-index"]["work_queue_name"] == "control"
    automations = api.post("/automations/filter", json={}).json()
    for triggered in ("build-index", "score", "curate"):
        assert any(a["name"].startswith(f"{triggered}__automation") for a in automations)
        assert deployments[triggered]["work_queue_name"] == "control"
    queue = api.post("/work_pools/clipbatch-local/queues/filter", json={}).json()
    assert {q["name"]: q["concurrency_limit"] for q in queue}.get("default") == 2

    data = tmp_path / "data"
    write_webdataset(data, shards=1, per_shard=4, seed=3, size=32)
    dest = tmp_path / "emb"
    body = {
        "parameters": {"source": str(data), "dest": str(dest), "model": "tiny", "device": "cpu"}
    }
    created = api.post(
        f"/deployments/{deployments['embed-adhoc']['id']}/create_flow_run", json=body
    )
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [installed.python, "-m", "prefect", "worker", "start", "--pool", "clipbatch-local", "--run-once"],
        cwd=elsewhere, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        state = None
        while time.monotonic() < deadline:
            state = api.get(f"/flow_runs/{run_id}").json()["state_type"]
            if state in FINAL:
                break
            time.sleep(1)
    finally:
        stop(worker)
        log.close()
    assert state == "COMPLETED", (state, (tmp_path / "worker.log").read_text()[-5000:])
    table, _ = read_table(str(dest))
    assert table.num_rows == 4
