"""Shared fixtures: one real embedded stack (S3, Prefect, Label Studio) per test session.

The stack runs from a temporary project (its own state dir, credentials and free
ports), so tests never touch the developer's own services or data. Label Studio's
virtualenv is shared with the repo's (installed once, on first use).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Client-side Prefect state for this test process stays out of ~/.prefect.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# A flow run that misses the test server's API URL fails instead of quietly starting a
# throwaway server of its own (what a thread without the test's settings context did).
os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "false"


def free_ports(n: int) -> list[int]:
    """n distinct bindable ports below the kernel's ephemeral range.

    Ports from bind(0) lie inside that range, so while a test has a service stopped
    an outgoing connection may take its port as a source port (or a reconnecting
    client may connect to itself), and the service cannot start again.
    """
    range_file = Path("/proc/sys/net/ipv4/ip_local_port_range")
    ephemeral_low = int(range_file.read_text().split()[0]) if range_file.exists() else 32768
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(15000, ephemeral_low)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


def write_project(root: Path, **service_overrides) -> Path:
    """A project directory with params.yaml on free ports; returns its root."""
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    s3_port, prefect_port, ls_port = free_ports(3)
    services = params["services"]
    services["s3"]["port"] = s3_port
    services["prefect"]["port"] = prefect_port
    services["label_studio"]["port"] = ls_port
    services["label_studio"]["venv"] = str(REPO / ".aligndiff" / "venvs" / "label-studio")
    for dotted, value in service_overrides.items():
        node = services
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def sibling_project(stack_project, root: Path, edit=None) -> Path:
    """A second project using the session's services (same ports and credentials)."""
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((stack_project.root / "params.yaml").read_text())
    # Its own Label Studio namespace, so tests sharing the server never see each other's tasks.
    params["services"]["label_studio"]["project_prefix"] = "test-" + hashlib.sha256(str(root).encode()).hexdigest()[:10]
    if edit:
        edit(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(stack_project.env_file, root / ".env")
    return root


def last_checkpoint_step(checkpoints: Path) -> int:
    """The global step of the newest ``last.ckpt`` under ``checkpoints`` (0: none yet)."""
    import torch

    last = list(checkpoints.glob("*/last.ckpt"))
    try:
        return torch.load(last[0], weights_only=False)["global_step"] if last else 0
    except Exception:  # caught mid-write
        return 0


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="session")
def stack_project(tmp_path_factory):
    """A git + DVC project whose embedded services are up for the whole session."""
    from components.project import Project
    from infra.stack import Stack

    root = write_project(tmp_path_factory.mktemp("project"))
    run(["git", "init", "-q"], root)
    run([sys.executable, "-m", "dvc", "init", "-q"], root)
    project = Project.load(root)
    stack = Stack(project)
    try:
        stack.up()
        yield project
    finally:
        stack.down()
        leftovers = [name for name in ("s3", "prefect", "label_studio") if stack.running_pid(name)]
        assert not leftovers, f"services still running after down: {leftovers}"


@pytest.fixture
def prefect_api(stack_project):
    """Point this process's Prefect client at the session's embedded server."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    with temporary_settings(updates={PREFECT_API_URL: stack_project.prefect_api_url,
                                     PREFECT_API_AUTH_STRING: stack_project.credentials.prefect_auth,
                                     PREFECT_HOME: str(stack_project.state_dir / "prefect-client")}):
        yield stack_project.prefect_api_url
        # Flush logs and events now: once the session stops the server, they could
        # only retry against a dead port while the interpreter exits.
        APILogWorker.drain_all()
        EventsWorker.drain_all()
