"""`aligndiff annotate` over a generated round: push, simulate, sync, snapshot."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from components import generate
from components.annotation import rounds
from components.project import Project
from flows.cli import main as cli
from tests.test_generate import _world_project


@pytest.mark.slow
def test_round_from_generations_to_label_snapshot(stack_project, tmp_path, capsys):
    project = _world_project(stack_project, tmp_path / "round")
    generate.run(project)  # 24 eval prompts × 2 images sharing x_T → 24 pairwise tasks
    root = ["--project", str(project.root)]

    def run(*args) -> dict:
        assert cli([*root, "annotate", *args]) == 0
        out = capsys.readouterr().out
        return json.loads(out[out.index("{"):])

    pushed = run("push", "--kind", "pairwise", "--limit", "20", "--seed", "1")
    assert pushed["selected"] == 20 and pushed["created"] == 20
    assert run("push", "--kind", "pairwise", "--limit", "20", "--seed", "1")["created"] == 0

    assert run("simulate", "--kind", "pairwise", "--annotators", "2", "--coverage", "2")["submitted"] == 40
    synced = run("sync", "--kind", "pairwise")
    assert synced["new"] == 40 and synced["per_annotator"] == {
        "annotator-1@simulated.aligndiff.local": 20, "annotator-2@simulated.aligndiff.local": 20}

    report = run("snapshot")
    assert report["annotations"] == 40 and report["tasks"] == 20
    prefs = pd.read_parquet(project.root / "data" / "labels" / "preferences.parquet")
    manifest = pd.read_parquet(project.path(generate.MANIFEST_OUT)).set_index("generation_id")
    for row in prefs.itertuples():  # every pair shares its initial noise, as D3PO needs
        assert manifest.loc[row.winner, "init_seed"] == manifest.loc[row.loser, "init_seed"]
        assert manifest.loc[row.winner, "prompt"] == row.prompt

    # A round after a gate that kept production: while some of its images have no label, the
    # sample stays; once all do, it grows (new seeds), so the round has new images to offer
    # and the labelled ones keep their ids and labels.
    assert rounds.grow_sample(Project.load(project.root)) == {
        "grown": False, "awaiting_labels": 8, "images": 48, "images_per_prompt": 2}
    assert run("push", "--kind", "pairwise")["created"] == 4
    run("simulate", "--kind", "pairwise", "--annotators", "2", "--coverage", "2")
    run("sync", "--kind", "pairwise")
    params_before = (project.root / "params.yaml").read_text().splitlines()
    assert rounds.grow_sample(Project.load(project.root)) == {
        "grown": True, "awaiting_labels": 0, "images": 48, "images_per_prompt": 6}
    params_after = (project.root / "params.yaml").read_text().splitlines()
    assert [(a, b) for a, b in zip(params_before, params_after) if a != b] == [
        ("  images_per_prompt: 2", "  images_per_prompt: 6")] and len(params_before) == len(params_after)
    generate.run(Project.load(project.root))
    grown = pd.read_parquet(project.path(generate.MANIFEST_OUT))
    assert len(grown) == 24 * 6 and set(manifest.index) <= set(grown["generation_id"])
    assert rounds.awaiting_labels(Project.load(project.root)) == (96, 144)
    assert run("push", "--kind", "pairwise")["created"] == 48


@pytest.mark.parametrize("args, message", [
    (["simulate", "--flip-rate", "1.5"], "flip-rate must be between 0 and 1, got 1.5"),
    (["simulate", "--annotators", "2", "--coverage", "3"], "coverage 3 is more than the 2 annotators"),
    (["push", "--limit", "-1"], "--limit -1: expected at least 1 task"),
    (["push", "--limit", "0"], "--limit 0: expected at least 1 task"),
    (["push", "--kind", "best_of_k", "--k", "1"], "--k 1: best_of_k shows 2 to 4 images per task"),
])
def test_bad_annotate_arguments_are_one_line_errors_before_anything_is_touched(stack_project, capsys, args,
                                                                             message):
    rounds_dir = stack_project.state_dir / "rounds"
    before = sorted(rounds_dir.iterdir()) if rounds_dir.exists() else []
    assert cli(["--project", str(stack_project.root), "annotate", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"aligndiff: error: {message}"), err
    assert (sorted(rounds_dir.iterdir()) if rounds_dir.exists() else []) == before


@pytest.mark.parametrize("action", ["push", "simulate", "sync"])
def test_an_unreachable_label_studio_is_one_line_naming_it(tmp_path, capsys, action):
    """A port where nothing listens: a real connection refusal, no server needed."""
    from components import credentials
    from components.project import Project
    from tests.conftest import write_project

    project = Project.load(write_project(tmp_path / "offline"))
    credentials.generate_missing(project.env_file)
    if action == "push":  # push reads its generations (production's) before it calls Label Studio
        from components import models
        from tests.models import save_tiny_world_model

        version = models.model_version(save_tiny_world_model(project.path("models/base")))
        generate_manifest = project.path(generate.MANIFEST_OUT)
        generate_manifest.parent.mkdir(parents=True)
        pd.DataFrame({"generation_id": ["a", "b"], "prompt": ["p", "p"], "init_seed": [0, 0], "noise_group": [0, 0],
                      "prompt_id": ["x", "x"], "image_key": ["k1", "k2"], "seed": [1, 2],
                      "model_version": [version, version]}).to_parquet(generate_manifest)
    assert cli(["--project", str(project.root), "annotate", action, "--kind", "pairwise"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0] == (f"aligndiff: error: Label Studio at {project.label_studio_url} is unreachable (ConnectError); "
                      "is it running? (`aligndiff status`)")


def test_push_without_generations_says_what_to_run(stack_project, tmp_path, capsys):
    from tests.conftest import sibling_project

    root = sibling_project(stack_project, tmp_path / "empty")
    assert cli(["--project", str(root), "annotate", "push"]) == 1
    assert "run `dvc repro generate` first" in capsys.readouterr().err


def test_the_sync_flow_fails_on_an_outage_but_skips_a_kind_never_pushed(stack_project, tmp_path):
    """An unreachable Label Studio used to read as "no project yet", a successful sync of nothing."""
    from components import credentials
    from components.errors import ServiceError
    from components.project import Project
    from flows.loop import sync
    from tests.conftest import sibling_project, write_project

    offline = Project.load(write_project(tmp_path / "offline"))
    credentials.generate_missing(offline.env_file)
    with pytest.raises(ServiceError, match="is unreachable"):
        sync.fn(str(offline.root), "pairwise")
    never_pushed = sibling_project(stack_project, tmp_path / "fresh")
    assert sync.fn(str(never_pushed), "pairwise") is None


def test_a_wrong_label_studio_api_key_is_one_line_saying_what_to_check(stack_project, tmp_path, capsys):
    from components import credentials
    from tests.conftest import sibling_project

    root = sibling_project(stack_project, tmp_path / "wrong-key")
    credentials.set_values(root / ".env", {credentials.LS_API_KEY: "0" * 40})
    assert cli(["--project", str(root), "annotate", "sync", "--kind", "pairwise"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aligndiff: error: Label Studio answered HTTP 401"), err
    assert err[0].endswith("check LABEL_STUDIO_API_KEY in .env") and "0" * 40 not in err[0]


def test_a_flow_run_from_the_cli_keeps_its_full_log_in_the_state_dir(stack_project, tmp_path):
    import json
    import os
    import stat
    import subprocess
    import sys

    from components.project import Project
    from tests.conftest import sibling_project

    root = sibling_project(stack_project, tmp_path / "logged")
    result = subprocess.run([sys.executable, "-m", "flows.cli", "--project", str(root), "run", "sync_annotations"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"binary": None, "pairwise": None}  # stdout stays JSON
    logs = list((Project.load(root).state_dir / "logs").glob("sync_annotations-*.log"))
    assert len(logs) == 1 and f"full log: {logs[0]}" in result.stderr
    text = logs[0].read_text()
    assert "pairwise: no project yet" in text and "Finished in state Completed" in text
    assert stat.S_IMODE(os.stat(logs[0]).st_mode) == 0o600
