"""End to end: the repository's dvc.yaml, reproduced through the Prefect flow on tiny settings."""

from __future__ import annotations

import json
import shutil
import sys

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO, run


def _tiny(params: dict) -> None:
    params["world"]["model"].update(channels=[16, 32], text_dim=32, text_layers=1)
    params["pretrain"].update(steps=4, batch_size=8, warmup_steps=1, probe_every=2, checkpoint_every=2)
    params["sample"]["steps"] = 3
    params["evaluate_base"]["images_per_composition"] = 1
    params["generate"].update(images_per_prompt=2, batch_size=16, splits=["eval"])


@pytest.fixture
def pipeline_project(stack_project, tmp_path):
    """A git + DVC project with this repository's stage graph and code, on the session's services."""
    from tests.conftest import sibling_project

    root = sibling_project(stack_project, tmp_path / "pipeline", edit=_tiny)
    for name in ("dvc.yaml",):
        shutil.copy(REPO / name, root / name)
    for folder in ("components", "prompts"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    run(["git", "init", "-q"], root)
    run([sys.executable, "-m", "dvc", "init", "-q"], root)
    from components.dvc_remote import configure_remote
    from components.project import Project

    configure_remote(Project.load(root))
    return root


@pytest.mark.slow
def test_reproduce_builds_every_stage_then_does_nothing(pipeline_project, prefect_api):
    from flows.pipeline import reproduce

    first = reproduce(root=str(pipeline_project))
    assert set(first["stages_run"]) == {"curate", "pretrain", "evaluate_base", "generate"}
    # the retrain stages wait for the first label snapshot
    assert first["skipped"] == {"train_reward": "data/labels", "finetune": "data/labels"}
    assert first["pushed"] > 0

    root = pipeline_project
    assert (root / "models" / "base" / "model_index.json").exists()
    metrics = json.loads((root / "reports" / "base_metrics.json").read_text())
    assert set(metrics) == {"seen", "unseen"}
    assert metrics["seen"]["images"] == 72 and metrics["unseen"]["images"] == 24
    assert {"aligned", "count", "colour", "shape", "background"} <= set(metrics["seen"])
    curve = pd.read_csv(root / "reports" / "pretrain_curve.csv")
    assert curve["step"].tolist() == [1, 2, 3, 4] and curve["align_seen"].notna().sum() == 2
    manifest = pd.read_parquet(root / "data" / "generations.parquet")
    assert len(manifest) == 24 * 2

    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"curate", "pretrain", "evaluate_base", "generate"}

    second = reproduce(root=str(pipeline_project))
    assert second["stages_run"] == []
    assert yaml.safe_load((root / "dvc.lock").read_text()) == lock
