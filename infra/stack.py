"""The embedded service stack: S3 (rclone), Prefect server and Label Studio on loopback.

Each service runs in its own process group (so ``down`` stops its children too),
keeps its data under the project's state directory and is described by a JSON
record in ``<state>/run/<name>.json``. ``up`` is idempotent, checks every port
before starting anything, waits for health with a progress display, and stops
whatever it started if any service fails to come up.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from components import credentials
from components.errors import ServiceError
from components.project import Project

LABEL_STUDIO_REQUIREMENTS = Path(__file__).with_name("label-studio.txt")


@dataclass
class Service:
    name: str
    title: str
    port: int
    url: str  # what a user opens
    health_url: str
    is_healthy_response: Callable[[int, bytes], bool]
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    embedded: bool = True


def _bin(name: str) -> str:
    """An executable installed next to this interpreter (the project venv)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise ServiceError(f"{path} not found: install the project first (make install)")
    return str(path)


def _http_get(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> tuple[int, bytes] | None:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read(4096)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(4096)
    except (urllib.error.URLError, OSError):
        return None


def port_in_use(host: str, port: int) -> bool:
    """True if some program listens on the port.

    A connect test, not a bind test: connections left over from a server we just
    stopped (a client's keep-alive sockets) block a bind for a while, but do not stop
    the servers here (which bind with SO_REUSEADDR) from listening again.
    """
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def port_stays_in_use(host: str, port: int, wait_s: float = 10.0) -> bool:
    """True if the port is still taken after ``wait_s``: a server stopped a moment ago
    (`aligndiff down && aligndiff up`) may still be letting go of it."""
    deadline = time.monotonic() + wait_s
    while port_in_use(host, port):
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.5)
    return False


class Stack:
    def __init__(self, project: Project):
        self.project = project
        self.run_dir = project.state_dir / "run"
        self.log_dir = project.state_dir / "logs"
        self._launched: dict[str, subprocess.Popen] = {}  # processes this object started

    # ---- service definitions -------------------------------------------------

    def services(self) -> list[Service]:
        p, svc = self.project, self.project.params.services
        state = p.state_dir
        creds = p.credentials if (svc.s3.embedded or svc.label_studio.embedded or svc.prefect.embedded) else None
        base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"),
                    "LANG": "C.UTF-8", "TMPDIR": str(state / "tmp")}
        s3_url = p.s3_endpoint or "https://s3.amazonaws.com"
        result = [
            Service(
                name="s3",
                title="S3 (rclone)",
                port=svc.s3.port,
                url=s3_url,
                health_url=s3_url + "/",
                # Anonymous requests are refused (4xx) by a server that requires auth.
                is_healthy_response=lambda status, _body: 400 <= status < 500,
                command=[_bin("rclone"), "serve", "s3", "--addr", f"{p.host}:{svc.s3.port}",
                         "--vfs-cache-mode", "off", str(state / "s3")],
                # CSV-quoted so the comma stays inside one key pair; passed by env so
                # the secret never appears in the process list.
                env={**base_env, "RCLONE_CONFIG": "/dev/null",
                     "RCLONE_AUTH_KEY": f'"{creds.s3_access_key},{creds.s3_secret_key}"'} if creds else {},
                embedded=svc.s3.embedded,
            ),
            Service(
                name="prefect",
                title="Prefect server",
                port=svc.prefect.port,
                url=p.prefect_ui_url,
                health_url=p.prefect_api_url + "/health",
                is_healthy_response=lambda status, body: status == 200 and body.strip() == b"true",
                command=[_bin("prefect"), "server", "start", "--host", p.host, "--port", str(svc.prefect.port)],
                env={**base_env, "PREFECT_HOME": str(state / "prefect"),
                     "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "true",
                     # the API the UI's browser code calls: this server's, not a profile's default
                     "PREFECT_UI_API_URL": p.prefect_api_url,
                     # basic auth on every API call but /health; the UI asks for the same string
                     **({"PREFECT_SERVER_API_AUTH_STRING": creds.prefect_auth} if creds and creds.prefect_auth else {})},
                embedded=svc.prefect.embedded,
            ),
            Service(
                name="label_studio",
                title="Label Studio",
                port=svc.label_studio.port,
                url=p.label_studio_url,
                health_url=p.label_studio_url + "/health",
                is_healthy_response=lambda status, body: status == 200 and b'"UP"' in body,
                command=[str(p.path(svc.label_studio.venv) / "bin" / "label-studio"), "start", "--no-browser",
                         "--internal-host", p.host, "--port", str(svc.label_studio.port)],
                env={**base_env,
                     "LABEL_STUDIO_BASE_DATA_DIR": str(state / "label-studio"),
                     "LABEL_STUDIO_USERNAME": creds.ls_username,
                     "LABEL_STUDIO_PASSWORD": creds.ls_password,
                     "LABEL_STUDIO_USER_TOKEN": creds.ls_api_key,
                     "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
                     "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
                     "LATEST_VERSION_CHECK": "false",
                     "COLLECT_ANALYTICS": "false",
                     # Error reports would go to sentry.io: nothing leaves the machine.
                     "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
                     # Lets S3 import storage point at our loopback S3 (SSRF guard).
                     "S3_ENDPOINT": p.s3_endpoint or ""} if creds else {},
                embedded=svc.label_studio.embedded,
            ),
        ]
        return result

    # ---- process records ------------------------------------------------------

    def _record_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def _read_record(self, name: str) -> dict | None:
        try:
            return json.loads(self._record_path(name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    @staticmethod
    def _alive(record: dict) -> bool:
        """True if the recorded process still runs and is the one we started (not a reused pid)."""
        pid = record["pid"]
        try:
            os.kill(pid, 0)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            return False
        if status[0] == "Z":  # exited, not yet reaped
            return False
        return str(record["port"]) in cmdline

    def running_pid(self, name: str) -> int | None:
        record = self._read_record(name)
        return record["pid"] if record and self._alive(record) else None

    # ---- lifecycle ------------------------------------------------------------

    def healthy(self, service: Service) -> bool:
        response = _http_get(service.health_url)
        return response is not None and service.is_healthy_response(*response)

    def up(self, console=None) -> dict[str, dict]:
        """Start every embedded service that is not running; wait until all are healthy."""
        from rich.console import Console

        console = console or Console(stderr=True)
        state = self.project.state_dir
        # Owner-only: the stores hold the data and Label Studio's database holds the S3 key
        # and API token in plain text. The services also run with umask 077 (see _start).
        state.mkdir(parents=True, exist_ok=True)
        state.chmod(0o700)
        for sub in ("run", "logs", "tmp", "s3", "prefect", "label-studio"):
            (state / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            (state / sub).chmod(0o700)
        for database in (state / "label-studio").glob("*.sqlite3"):  # made by an older version
            database.chmod(0o600)
        added = credentials.generate_missing(self.project.env_file)
        if added:
            console.print(f"generated credentials in {self.project.env_file} (mode 0600): {', '.join(added)}")

        services = [s for s in self.services() if s.embedded]
        to_start = []
        for service in services:
            if self.running_pid(service.name):
                continue
            self._record_path(service.name).unlink(missing_ok=True)
            if port_stays_in_use(self.project.host, service.port):
                raise ServiceError(
                    f"port {service.port} for {service.title} is already in use by another program; "
                    f"stop it or set services.{service.name}.port in params.yaml"
                )
            to_start.append(service)

        if any(s.name == "label_studio" for s in to_start):
            self.ensure_label_studio_venv(console)

        started: list[Service] = []
        t0 = time.monotonic()
        try:
            for service in to_start:
                self._start(service)
                started.append(service)
            timings = self._wait_healthy(services, console, t0)
            self._post_start(console)
        except BaseException:
            for service in started:
                self._stop(service.name)
            raise
        return {
            s.name: {"started": s in started, "seconds_to_healthy": timings.get(s.name), "url": s.url}
            for s in services
        }

    def _start(self, service: Service) -> None:
        log_path = self.log_dir / f"{service.name}.log"
        with open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
            log.write(f"\n--- aligndiff: starting {service.title} at {time.ctime()} ---\n".encode())
            log.flush()
            proc = subprocess.Popen(
                service.command, env=service.env, cwd=self.project.state_dir, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, umask=0o077,
            )
        self._launched[service.name] = proc
        record = {"pid": proc.pid, "port": service.port, "url": service.url, "log": str(log_path),
                  "started_at": time.time()}
        tmp = self._record_path(service.name).with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self._record_path(service.name))

    def _wait_healthy(self, services: list[Service], console, t0: float) -> dict[str, float]:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        timeout = self.project.params.services.startup_timeout_s
        pending = {s.name: s for s in services}
        timings: dict[str, float] = {}
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=console, transient=False) as progress:
            tasks = {name: progress.add_task(f"{s.title:<15} waiting for {s.health_url}", total=1)
                     for name, s in pending.items()}
            while pending:
                for name, service in list(pending.items()):
                    if self.healthy(service):
                        timings[name] = round(time.monotonic() - t0, 1)
                        progress.update(tasks[name], completed=1,
                                        description=f"{service.title:<15} healthy at {service.url}")
                        del pending[name]
                    elif self._exited(name):
                        raise ServiceError(f"{service.title} exited during start-up; {self._log_hint(name)}")
                if pending and time.monotonic() - t0 > timeout:
                    names = ", ".join(s.title for s in pending.values())
                    raise ServiceError(
                        f"{names} not healthy after {timeout:.0f} s (services.startup_timeout_s); "
                        + "; ".join(self._log_hint(n) for n in pending)
                    )
                time.sleep(0.5)
        return timings

    def _exited(self, name: str) -> bool:
        """A process we just launched is asked directly: until it has exec'd, its /proc
        cmdline is still ours, which the pid record's check would read as "gone"."""
        proc = self._launched.get(name)
        return proc.poll() is not None if proc else not self.running_pid(name)

    def _log_hint(self, name: str) -> str:
        log = self.log_dir / f"{name}.log"
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
        last = lines[-1][:200] if lines else "(empty)"
        return f"see {log} (last line: {last})"

    def _post_start(self, console) -> None:
        """Make the running services usable: buckets exist, the API token works, DVC knows the remote."""
        p, svc = self.project, self.project.params.services
        for bucket in (svc.s3.bucket, svc.s3.dvc_bucket):
            p.object_store(bucket).ensure_bucket()
        if svc.label_studio.embedded:
            check_label_studio_token(p)
        if (p.root / ".dvc").is_dir():
            from components.dvc_remote import configure_remote

            configure_remote(p)

    def _stop(self, name: str, grace_s: float = 20.0) -> bool:
        record = self._read_record(name)
        stopped = False
        if record and self._alive(record):
            pgid = record["pid"]
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and _group_alive(pgid):
                time.sleep(0.2)
            if _group_alive(pgid):
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                while _group_alive(pgid):
                    time.sleep(0.1)
            stopped = True
        self._record_path(name).unlink(missing_ok=True)
        return stopped

    def down(self) -> list[str]:
        """Stop every process the stack started; data stays in place. Returns the names stopped."""
        return [s.name for s in self.services() if self._stop(s.name)]

    def status(self) -> dict[str, dict]:
        out = {}
        for service in self.services():
            out[service.name] = {
                "title": service.title,
                "embedded": service.embedded,
                "url": service.url,
                "pid": self.running_pid(service.name) if service.embedded else None,
                "healthy": self.healthy(service),
            }
        return out

    # ---- Label Studio's own virtualenv -----------------------------------------

    def ensure_label_studio_venv(self, console) -> Path:
        venv = self.project.path(self.project.params.services.label_studio.venv)
        digest = hashlib.sha256(LABEL_STUDIO_REQUIREMENTS.read_bytes()).hexdigest()
        marker = venv / ".aligndiff-installed"
        if marker.exists() and marker.read_text().strip() == digest:
            return venv
        if venv.exists():
            # Replaced only if it is a virtualenv: a path set by mistake to a folder of the
            # user's must never be deleted.
            if not (venv / "pyvenv.cfg").is_file():
                raise ServiceError(f"{venv} exists and is not a virtualenv (no pyvenv.cfg); point "
                                   "services.label_studio.venv at a new folder or an existing venv")
            shutil.rmtree(venv)
        venv.parent.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / "label-studio-install.log"
        with console.status(f"installing Label Studio into {venv} (first time only, ~2 min; log: {log_path})"), \
                open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as log:
            for cmd in ([sys.executable, "-m", "venv", str(venv)],
                        [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "-q",
                         "-r", str(LABEL_STUDIO_REQUIREMENTS)]):
                if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                    shutil.rmtree(venv, ignore_errors=True)
                    raise ServiceError(f"installing Label Studio failed: {' '.join(cmd[:3])}...; see {log_path}")
        marker.write_text(digest)
        return venv


def _group_alive(pgid: int) -> bool:
    """True while any non-zombie process of the group exists."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def check_label_studio_token(project: Project) -> None:
    """An authenticated call, so a wrong token fails `up` rather than the first sync."""
    response = _http_get(project.label_studio_url + "/api/current-user/whoami",
                         timeout=10, headers={"Authorization": f"Token {project.credentials.ls_api_key}"})
    if response is None or response[0] != 200:
        code = response[0] if response else "no response"
        raise ServiceError(
            f"Label Studio at {project.label_studio_url} rejected LABEL_STUDIO_API_KEY ({code}); "
            f"if its data in {project.state_dir / 'label-studio'} predates the key, create a token in the UI "
            "and put it in .env"
        )
