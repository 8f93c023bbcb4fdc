"""Recording pipeline results in git (only inside a git checkout; a plain directory is left alone)."""

from __future__ import annotations

import subprocess

from components.errors import UserError
from components.project import Project


def commit(project: Project, paths: list[str], message: str) -> str | None:
    """Commit the given paths (those that exist); the new commit id, or None when nothing changed."""
    if not (project.root / ".git").exists():
        return None
    existing = [p for p in paths if project.path(p).exists()]

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *identity, *args], cwd=project.root, capture_output=True, text=True)

    identity: list[str] = []
    if not git("config", "user.email").stdout.strip():  # a fresh machine: commit as aligndiff, not fail
        identity = ["-c", "user.name=aligndiff", "-c", "user.email=aligndiff@localhost"]

    git("add", "--", *existing)
    if git("diff", "--cached", "--quiet", "--", *existing).returncode == 0:
        return None
    done = git("commit", "-m", message, "--", *existing)
    if done.returncode != 0:
        raise UserError(f"git commit failed: {done.stderr.strip() or done.stdout.strip()}")
    return git("rev-parse", "HEAD").stdout.strip()
