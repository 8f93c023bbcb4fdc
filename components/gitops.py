"""Recording pipeline results in git (only inside a git checkout; a plain directory is left alone)."""

from __future__ import annotations

import os
import subprocess
import tempfile

from components.errors import UserError
from components.project import Project


def commit(project: Project, paths: list[str], message: str, as_of: dict[str, bytes] | None = None) -> str | None:
    """Commit the given paths (those that exist); the new commit id, or None when nothing changed.

    ``as_of`` pins a path to the content it had when the work began (e.g. the params.yaml a
    run started with): if the file was edited meanwhile, the commit records the pinned
    content and the edit stays in the working tree, uncommitted. The commit is built in a
    private index, so changes the user has staged are never swept in.
    """
    if not (project.root / ".git").exists():
        return None
    existing = [p for p in paths if project.path(p).exists()]
    identity: list[str] = []

    def git(*args: str, env: dict | None = None, stdin: bytes | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(["git", *identity, *args], cwd=project.root, capture_output=True, env=env, input=stdin)
        done.stdout, done.stderr = done.stdout.decode(), done.stderr.decode()
        return done

    if not git("config", "user.email").stdout.strip():  # a fresh machine: commit as aligndiff, not fail
        identity = ["-c", "user.name=aligndiff", "-c", "user.email=aligndiff@localhost"]
    has_head = git("rev-parse", "--verify", "-q", "HEAD").returncode == 0
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": os.path.join(tmp, "index")}
        if has_head:
            git("read-tree", "HEAD", env=env)
        git("add", "--", *existing, env=env)
        for path, content in (as_of or {}).items():
            if path in existing and project.path(path).read_bytes() != content:
                blob = git("hash-object", "-w", "--stdin", stdin=content).stdout.strip()
                git("update-index", "--cacheinfo", f"100644,{blob},{path}", env=env)
        if git("diff", "--cached", "--quiet", *(["HEAD"] if has_head else []), env=env).returncode == 0:
            return None
        done = git("commit", "-q", "-m", message, env=env)
        if done.returncode != 0:
            raise UserError(f"git commit failed: {done.stderr.strip() or done.stdout.strip()}")
    git("reset", "-q", "--", *existing)  # the real index follows the commit for these paths
    return git("rev-parse", "HEAD").stdout.strip()
