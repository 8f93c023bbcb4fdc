"""`aligndiff annotate` over a generated round: push, simulate, sync, snapshot."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from components import generate
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


def test_bad_annotator_settings_are_one_line_errors(stack_project, tmp_path, capsys):
    assert cli(["--project", str(stack_project.root), "annotate", "simulate", "--flip-rate", "1.5"]) == 1
    assert capsys.readouterr().err.strip() == "aligndiff: error: flip-rate must be between 0 and 1, got 1.5"


def test_push_without_generations_says_what_to_run(stack_project, tmp_path, capsys):
    from tests.conftest import sibling_project

    root = sibling_project(stack_project, tmp_path / "empty")
    assert cli(["--project", str(root), "annotate", "push"]) == 1
    assert "run `dvc repro generate` first" in capsys.readouterr().err
