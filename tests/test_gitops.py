"""What a pipeline commit records: exactly its own outputs and the params it started with."""

import shutil
import subprocess
from pathlib import Path

from components import gitops
from components.project import Project

REPO = Path(__file__).resolve().parents[1]


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args], cwd=root,
                          check=True, capture_output=True, text=True).stdout


def checkout(tmp_path: Path) -> Project:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "start")
    return Project.load(tmp_path)


def test_an_edit_to_params_during_a_run_stays_uncommitted(tmp_path):
    project = checkout(tmp_path)
    started_with = (tmp_path / "params.yaml").read_bytes()
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # the run's output
    edited = started_with.replace(b"seed: 0", b"seed: 7")
    assert edited != started_with
    (tmp_path / "params.yaml").write_bytes(edited)  # the user edits params while the run goes on

    commit = gitops.commit(project, ["dvc.lock", "params.yaml"], "Retrain", as_of={"params.yaml": started_with})

    assert commit == git(tmp_path, "rev-parse", "HEAD").strip()
    assert git(tmp_path, "show", "HEAD:params.yaml").encode() == started_with
    assert "stages: {}" in git(tmp_path, "show", "HEAD:dvc.lock")
    assert (tmp_path / "params.yaml").read_bytes() == edited
    assert git(tmp_path, "status", "--porcelain").splitlines() == [" M params.yaml"]


def test_changes_the_user_staged_are_not_swept_into_the_commit(tmp_path):
    project = checkout(tmp_path)
    (tmp_path / "notes.md").write_text("work in progress\n")
    git(tmp_path, "add", "notes.md")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")

    gitops.commit(project, ["dvc.lock", "params.yaml"], "Retrain")

    assert git(tmp_path, "show", "--name-only", "--format=", "HEAD").split() == ["dvc.lock"]
    assert git(tmp_path, "status", "--porcelain").splitlines() == ["A  notes.md"]


def test_nothing_to_record_makes_no_commit(tmp_path):
    project = checkout(tmp_path)
    before = git(tmp_path, "rev-parse", "HEAD")
    assert gitops.commit(project, ["dvc.lock", "params.yaml", "missing.json"], "Retrain") is None
    assert git(tmp_path, "rev-parse", "HEAD") == before
