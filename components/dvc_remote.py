"""Point the project's DVC default remote at the configured S3 endpoint.

The remote's name and URL go into .dvc/config (committed, shared by the team);
the endpoint and credentials go into .dvc/config.local (git-ignored by DVC),
because they differ per machine and must never be committed. Written through
DVC's config API rather than `dvc remote modify`, so secrets never appear in a
process list.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from components.project import Project

REMOTE_NAME = "storage"


def dvc_env(project: Project) -> dict[str, str]:
    """Environment for DVC: stage commands (`python -m components...`) run with this
    interpreter's environment first on PATH; the site cache stays in the state dir."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if not path.startswith(bin_dir + os.pathsep):
        path = bin_dir + os.pathsep + path
    return {"PATH": path, "DVC_SITE_CACHE_DIR": str(project.state_dir / "dvc-site-cache"), "DVC_NO_ANALYTICS": "1"}


def configure_remote(project: Project) -> None:
    from dvc.config import Config

    os.environ.update(dvc_env(project))
    config = Config(dvc_dir=str(project.root / ".dvc"))
    with config.edit("repo") as conf:
        remote = conf["remote"].setdefault(REMOTE_NAME, {})
        remote["url"] = project.dvc_remote_url
        conf["core"]["remote"] = REMOTE_NAME
    creds = project.credentials
    with config.edit("local") as conf:
        local = {
            "access_key_id": creds.s3_access_key,
            "secret_access_key": creds.s3_secret_key,
            "region": project.params.services.s3.region,
        }
        if project.s3_endpoint:
            local["endpointurl"] = project.s3_endpoint
        conf["remote"][REMOTE_NAME] = local
    os.chmod(project.root / ".dvc" / "config.local", 0o600)


def track(project: Project, relative: str | Path) -> None:
    """Version a directory written outside the stage graph (the label snapshot) with `dvc add`."""
    if not (project.root / ".dvc").is_dir():
        return
    from dvc.repo import Repo

    os.environ.update(dvc_env(project))
    with Repo(str(project.root)) as repo:
        repo.add(str(project.path(relative)))
