"""Service credentials: the process environment first, then the git-ignored env file.

For the embedded stack the file is generated once (``generate_missing``) with mode
0600; for external services the user writes the same variable names into it (or
exports them). Values are never logged: use :func:`redact` for anything shown.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

S3_ACCESS_KEY = "ALIGNDIFF_S3_ACCESS_KEY_ID"
S3_SECRET_KEY = "ALIGNDIFF_S3_SECRET_ACCESS_KEY"
LS_USERNAME = "LABEL_STUDIO_USERNAME"
LS_PASSWORD = "LABEL_STUDIO_PASSWORD"
LS_API_KEY = "LABEL_STUDIO_API_KEY"
# Prefect's own client setting: `user:password` for the server's basic auth. Generated for
# the embedded server; optional for an external one that has no auth.
PREFECT_AUTH = "PREFECT_API_AUTH_STRING"

_GENERATORS = {
    S3_ACCESS_KEY: lambda: "AD" + secrets.token_hex(9).upper(),
    S3_SECRET_KEY: lambda: secrets.token_urlsafe(30),
    LS_USERNAME: lambda: "admin@aligndiff.local",
    LS_PASSWORD: lambda: secrets.token_urlsafe(18),
    # Label Studio's legacy token must be exactly 40 characters.
    LS_API_KEY: lambda: secrets.token_hex(20),
    PREFECT_AUTH: lambda: "admin:" + secrets.token_urlsafe(24),
}


@dataclass(frozen=True)
class Credentials:
    s3_access_key: str
    s3_secret_key: str
    ls_username: str
    ls_password: str
    ls_api_key: str
    prefect_auth: str | None = None

    def __repr__(self) -> str:  # never leak values into logs or tracebacks
        return "Credentials(<redacted>)"


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    return values


def generate_missing(path: Path) -> list[str]:
    """Add any missing credential to the env file (mode 0600); return the names added.

    Existing values, and values supplied by the environment, are kept as they are.
    """
    current = read_env_file(path)
    added = [k for k in _GENERATORS if k not in current and k not in os.environ]
    if not added and path.exists():
        _owner_only(path)
        return []
    set_values(path, {k: _GENERATORS[k]() for k in added})
    return added


def set_values(path: Path, values: dict[str, str]) -> None:
    """Set variables in the env file, atomically and with mode 0600; other lines stay."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else [
        "# aligndiff service credentials (git-ignored; keep mode 0600)"
    ]
    pending = dict(values)
    for i, line in enumerate(lines):
        key = line.partition("=")[0].strip().removeprefix("export ").strip()
        if "=" in line and not line.lstrip().startswith("#") and key in pending:
            lines[i] = f"{key}={pending.pop(key)}"
    lines += [f"{k}={v}" for k, v in pending.items()]
    tmp = path.with_name(path.name + ".tmp")
    # A stale temporary file (from a crash) would keep its old mode through O_CREAT:
    # remove it, create anew with O_EXCL, so the secrets are 0600 from the first byte.
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _owner_only(path)


def _owner_only(path: Path) -> None:
    """Make ``path`` mode 0600 and check that it is."""
    from components.errors import UserError

    os.chmod(path, 0o600)
    mode = path.stat().st_mode & 0o777
    if mode != 0o600:
        raise UserError(f"{path}: mode is {mode:o}, expected 600 (its filesystem ignores permissions?); "
                        "keep credentials on a filesystem that honours them")


def load(path: Path) -> Credentials:
    from components.errors import UserError

    file_values = read_env_file(path)

    def get(name: str) -> str:
        value = os.environ.get(name) or file_values.get(name)
        if not value:
            raise UserError(f"{path}: {name} is not set (run `aligndiff init`, or export it)")
        return value

    return Credentials(
        s3_access_key=get(S3_ACCESS_KEY),
        s3_secret_key=get(S3_SECRET_KEY),
        ls_username=get(LS_USERNAME),
        ls_password=get(LS_PASSWORD),
        ls_api_key=get(LS_API_KEY),
        prefect_auth=os.environ.get(PREFECT_AUTH) or file_values.get(PREFECT_AUTH) or None,
    )
