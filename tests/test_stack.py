"""The embedded service stack: up/status/down, idempotence, busy ports, no leftovers."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import urllib.request

import pytest

from components.errors import ServiceError
from components.project import Project
from infra.stack import Stack, _group_alive
from tests.conftest import write_project


def _aligndiff(root, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "--project", str(root), *args],
                          capture_output=True, text=True, timeout=600)


def test_status_json_shows_three_healthy_services_with_urls(stack_project):
    result = _aligndiff(stack_project.root, "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert set(status) == {"s3", "prefect", "label_studio"}
    for name, service in status.items():
        assert service["healthy"], name
        assert service["url"].startswith("http://127.0.0.1:")
        assert isinstance(service["pid"], int)
    # The Prefect UI is served, not just the API.
    with urllib.request.urlopen(status["prefect"]["url"] + "/", timeout=10) as resp:
        assert resp.status == 200 and b"<html" in resp.read(2048).lower()


def test_status_prints_no_secrets(stack_project):
    secrets = [stack_project.credentials.s3_secret_key, stack_project.credentials.ls_api_key,
               stack_project.credentials.ls_password]
    for args in (("status",), ("status", "--json"), ("up",)):
        result = _aligndiff(stack_project.root, *args)
        for secret in secrets:
            assert secret not in result.stdout + result.stderr


def test_up_is_idempotent(stack_project):
    stack = Stack(stack_project)
    pids = {n: stack.running_pid(n) for n in ("s3", "prefect", "label_studio")}
    result = stack.up()
    assert not any(r["started"] for r in result.values())
    assert {n: stack.running_pid(n) for n in pids} == pids


def test_credentials_file_is_private_and_secrets_stay_out_of_argv(stack_project):
    mode = stat.S_IMODE(os.stat(stack_project.env_file).st_mode)
    assert mode == 0o600
    pid = Stack(stack_project).running_pid("s3")
    cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode()
    assert stack_project.credentials.s3_secret_key not in cmdline


def test_busy_port_fails_clearly_and_starts_nothing(tmp_path):
    root = write_project(tmp_path / "p")
    project = Project.load(root)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", project.params.services.label_studio.port))
    blocker.listen()
    try:
        result = _aligndiff(root, "up")
        assert result.returncode == 1
        err = result.stderr.strip().splitlines()[-1]
        assert f"port {project.params.services.label_studio.port} for Label Studio is already in use" in err
        assert "services.label_studio.port" in err
        stack = Stack(project)
        assert all(stack.running_pid(n) is None for n in ("s3", "prefect", "label_studio"))
        assert not list((project.state_dir / "run").glob("*.json"))
    finally:
        blocker.close()


def test_lifecycle_up_status_down_leaves_no_process(tmp_path, stack_project):
    """A second project embeds only S3 and uses the session's Prefect and Label Studio."""
    root = write_project(
        tmp_path / "p",
        **{"prefect.embedded": False, "prefect.api_url": stack_project.prefect_api_url,
           "label_studio.embedded": False, "label_studio.url": stack_project.label_studio_url},
    )
    up = _aligndiff(root, "up", "--json")
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["services"]["s3"]["started"] is True

    status = json.loads(_aligndiff(root, "status", "--json").stdout)
    assert status["s3"]["healthy"] and status["s3"]["embedded"]
    assert status["prefect"]["healthy"] and not status["prefect"]["embedded"]
    assert status["prefect"]["pid"] is None
    pgid = status["s3"]["pid"]

    again = json.loads(_aligndiff(root, "up", "--json").stdout)
    assert again["services"]["s3"]["started"] is False

    down = _aligndiff(root, "down")
    assert down.returncode == 0 and "s3" in down.stdout
    assert not _group_alive(pgid)
    after = _aligndiff(root, "status", "--json")
    assert after.returncode == 1
    assert json.loads(after.stdout)["s3"]["healthy"] is False
    # Data stays in place after down.
    assert (Project.load(root).state_dir / "s3" / "aligndiff").is_dir()


def test_service_that_dies_during_startup_is_reported_with_its_log(tmp_path, monkeypatch):
    root = write_project(tmp_path / "p", **{"prefect.embedded": False, "prefect.api_url": "http://127.0.0.1:9/api",
                                            "label_studio.embedded": False, "label_studio.url": "http://127.0.0.1:9"})
    project = Project.load(root)
    stack = Stack(project)
    original = stack.services

    def broken_services():
        services = original()
        services[0].command = [services[0].command[0], "serve", "s3", "--no-such-flag"]
        return services

    monkeypatch.setattr(stack, "services", broken_services)
    with pytest.raises(ServiceError, match=r"S3 \(rclone\) exited during start-up; see .*s3.log"):
        stack.up()
    assert stack.running_pid("s3") is None


def test_state_is_private_to_its_owner(stack_project):
    """Label Studio's database holds the S3 key and the API token; the stores hold the data."""
    state = stack_project.state_dir

    def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)

    assert mode(state) == 0o700
    for sub in ("s3", "label-studio", "prefect", "logs", "run"):
        assert mode(state / sub) == 0o700, sub
    databases = list((state / "label-studio").glob("*.sqlite3"))
    assert databases and all(mode(db) == 0o600 for db in databases)
    assert mode(state / "prefect" / "prefect.db") == 0o600
    assert all(mode(log) == 0o600 for log in (state / "logs").glob("*.log"))
    # what the services write later is owner-only too (they run with umask 077)
    objects = [p for p in (state / "s3").rglob("*") if p.is_file()]
    assert objects and all(mode(p) & 0o077 == 0 for p in objects)


def test_prefect_api_refuses_requests_without_the_generated_credential(stack_project):
    import base64
    import urllib.error

    api = stack_project.prefect_api_url
    auth = stack_project.credentials.prefect_auth
    assert auth and auth.startswith("admin:") and len(auth) > 30
    for headers in ({}, {"Authorization": "Basic " + base64.b64encode(b"admin:wrong").decode()}):
        request = urllib.request.Request(api + "/flows/filter", data=b"{}", method="POST", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
    request = urllib.request.Request(api + "/flows/filter", data=b"{}", method="POST",
                                     headers={"Authorization": "Basic " + base64.b64encode(auth.encode()).decode(),
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(api + "/health", timeout=10) as resp:  # probes stay open, as in Kubernetes
        assert resp.status == 200


def test_a_label_studio_venv_setting_pointing_at_a_user_folder_never_deletes_it(tmp_path):
    from rich.console import Console

    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    project = Project.load(write_project(tmp_path / "p", **{"label_studio.venv": str(mine)}))
    with pytest.raises(ServiceError, match="is not a virtualenv"):
        Stack(project).ensure_label_studio_venv(Console(quiet=True))
    assert (mine / "thesis.tex").read_text() == "years of work"
