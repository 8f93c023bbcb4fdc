"""The git-ignored .env: secrets are owner-only from the first byte, whatever was there before."""

from __future__ import annotations

import os
import stat

from components import credentials


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_stale_world_readable_temporary_file_does_not_leak_its_mode(tmp_path):
    env = tmp_path / ".env"
    stale = tmp_path / ".env.tmp"
    stale.write_text("left over by a crash\n")
    stale.chmod(0o644)
    added = credentials.generate_missing(env)
    assert set(added) >= {credentials.S3_SECRET_KEY, credentials.LS_API_KEY, credentials.PREFECT_AUTH}
    assert _mode(env) == 0o600 and not stale.exists()
    assert "left over" not in env.read_text()


def test_an_existing_world_readable_env_file_is_made_private_and_kept(tmp_path):
    env = tmp_path / ".env"
    env.write_text("# mine\nLABEL_STUDIO_API_KEY=abc\n")
    env.chmod(0o644)
    credentials.generate_missing(env)
    assert _mode(env) == 0o600
    values = credentials.read_env_file(env)
    assert values[credentials.LS_API_KEY] == "abc" and env.read_text().startswith("# mine\n")
    env.chmod(0o644)
    assert credentials.generate_missing(env) == [] and _mode(env) == 0o600


def test_the_prefect_credential_is_optional_for_an_external_server(tmp_path, monkeypatch):
    env = tmp_path / ".env"
    credentials.generate_missing(env)
    lines = [ln for ln in env.read_text().splitlines() if not ln.startswith(credentials.PREFECT_AUTH)]
    env.write_text("\n".join(lines) + "\n")
    monkeypatch.delenv(credentials.PREFECT_AUTH, raising=False)
    assert credentials.load(env).prefect_auth is None
    monkeypatch.setenv(credentials.PREFECT_AUTH, "me:secret")
    assert credentials.load(env).prefect_auth == "me:secret"
    assert "secret" not in repr(credentials.load(env))
