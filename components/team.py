"""Point a project at the team stack of ``infra/compose.yaml``.

The stack's env file (``infra/.env``) is the one place its ports, buckets and
secrets are written down; from it this module renders what aligndiff needs:

- the ``services`` section of params.yaml: every service external (``embedded:
  false``) at the published endpoints;
- the credentials, under aligndiff's variable names, in the project's git-ignored
  ``.env`` (mode 0600) — never in params.yaml.

Processes inside the stack's network (the worker) reach the services by other names;
compose gives them ``ALIGNDIFF_*_URL`` variables, which override these endpoints.
"""

from __future__ import annotations

import os
from pathlib import Path

from components import credentials
from components.errors import UserError

# aligndiff's credential variable ← the compose env file's variable
CREDENTIALS_FROM_COMPOSE = {
    credentials.S3_ACCESS_KEY: "S3_ACCESS_KEY",
    credentials.S3_SECRET_KEY: "S3_SECRET_KEY",
    credentials.LS_USERNAME: "LABEL_STUDIO_USERNAME",
    credentials.LS_PASSWORD: "LABEL_STUDIO_PASSWORD",
    credentials.LS_API_KEY: "LABEL_STUDIO_API_KEY",
    credentials.PREFECT_AUTH: "PREFECT_AUTH_STRING",
}
# the compose file's defaults, for variables the env file leaves out
COMPOSE_DEFAULTS = {"S3_PORT": "9000", "PREFECT_PORT": "4200", "LABEL_STUDIO_PORT": "8080",
                    "S3_BUCKET": "aligndiff", "S3_DVC_BUCKET": "aligndiff-dvc", "BIND_ADDRESS": "127.0.0.1"}


def read_compose_env(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise UserError(f"{path}: not found (copy infra/.env.example and fill in the secrets)")
    return {**COMPOSE_DEFAULTS, **{k: v for k, v in credentials.read_env_file(path).items() if v}}


def render(env: dict[str, str], source: Path, host: str | None = None) -> tuple[dict, dict[str, str]]:
    """(params.yaml ``services`` updates, credentials) for the stack described by ``env``."""
    for name in ("S3_PORT", "PREFECT_PORT", "LABEL_STUDIO_PORT"):
        if not env[name].isdigit() or not 0 < int(env[name]) < 65536:
            raise UserError(f"{source}: {name}={env[name]!r} is not a port number (1-65535)")
    missing = [name for name in CREDENTIALS_FROM_COMPOSE.values() if not env.get(name)]
    if missing:
        raise UserError(f"{source}: {', '.join(missing)} not set (the stack's secrets; see infra/.env.example)")
    if host is None:  # a wildcard bind is reached on loopback from the same machine
        host = "127.0.0.1" if env["BIND_ADDRESS"] in ("0.0.0.0", "::") else env["BIND_ADDRESS"]
    services = {
        "s3": {"embedded": False, "endpoint_url": f"http://{host}:{env['S3_PORT']}",
               "bucket": env["S3_BUCKET"], "dvc_bucket": env["S3_DVC_BUCKET"]},
        "prefect": {"embedded": False, "api_url": f"http://{host}:{env['PREFECT_PORT']}/api"},
        "label_studio": {"embedded": False, "url": f"http://{host}:{env['LABEL_STUDIO_PORT']}"},
    }
    creds = {ours: env[theirs] for ours, theirs in CREDENTIALS_FROM_COMPOSE.items()}
    return services, creds


def connect(project_root: Path, compose_env: Path, host: str | None = None,
            params_file: str = "params.yaml") -> dict:
    """Rewrite the project's params.yaml services and .env credentials for the stack.

    Both files are validated before either is replaced, so a bad env file changes nothing.
    """
    from components.config import load_params, patched_params_text

    params_path = project_root / params_file
    services, creds = render(read_compose_env(compose_env), compose_env, host)
    text = patched_params_text(params_path, {"services": services})
    tmp = params_path.with_name(params_path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        load_params(tmp)
    except Exception:
        tmp.unlink()
        raise
    credentials.set_values(project_root / ".env", creds)
    os.replace(tmp, params_path)
    return services
