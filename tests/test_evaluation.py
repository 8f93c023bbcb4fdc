"""evaluate → gate → promote on a tiny world model, with the real embedded S3 and git."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from components import evaluate, gate, models, registry
from components.config import GateParams
from components.errors import UserError
from components.finetune import stage as finetune_stage
from components.project import Project
from components.reward import train as reward_train
from flows.cli import main as cli
from tests.test_training_stages import _project


@pytest.fixture(scope="module")
def tuned(stack_project, tmp_path_factory):
    project = _project(stack_project, tmp_path_factory.mktemp("evaluation") / "project",
                       **{"evaluate.max_prompts": 4, "evaluate.images_per_prompt": 2, "evaluate.grid_prompts": 3,
                          "finetune.method": "d3po", "finetune.d3po.lr": 1e-2})
    for args in (["init", "-q"], ["config", "user.email", "t@example.org"], ["config", "user.name", "t"]):
        subprocess.run(["git", *args], cwd=project.root, check=True)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "start"], cwd=project.root, check=True)
    subprocess.run(["python", "-m", "dvc", "init", "-q"], cwd=project.root, check=True)
    reward_train.train_reward(project.params, project.root, project.object_store())
    finetune_stage.finetune(project)
    return project


def test_evaluate_compares_candidate_and_production_with_the_same_seeds(tuned):
    metrics = evaluate.evaluate(tuned)
    assert metrics["prompts"] == 4 and metrics["images_per_model"] == 8
    assert metrics["production"] == models.model_version(tuned.path("models/base"))
    reward = metrics["reward"]
    lo, hi = reward["win_rate_interval"]["low"], reward["win_rate_interval"]["high"]
    assert 0 <= lo <= reward["win_rate"] <= hi <= 1
    split = reward["win_rate_by_judge"]
    assert sum(row["pairs"] for row in split.values()) == 8
    before, after = (metrics["judge"][m]["all"]["aligned"] for m in ("production", "candidate"))
    assert split["improved"]["pairs"] - split["worsened"]["pairs"] == round(8 * (after - before))
    assert set(metrics["judge"]["candidate"]["all"]) == {"aligned", "count", "colour", "shape", "background"}
    assert metrics["drift"] > 0  # the fine-tune changed the images
    assert metrics["memorization"]["near_copy_rate"] == 0
    assert json.loads(tuned.path(evaluate.METRICS_OUT).read_text()) == metrics
    grid = Image.open(tuned.path(evaluate.GRID_OUT))
    assert grid.size == (3 * (32 + 4) * 5, 3 * (32 + 4) * 3)  # 2+gap+2 columns, 3 prompt rows, ×3
    report = tuned.path(evaluate.REPORT_OUT).read_text()
    assert f"| {reward['win_rate']} ({lo}–{hi}) |" in report and "evaluation_grid.png" in report
    assert f"| unchanged | {split['unchanged']['pairs']} |" in report


def test_win_rate_interval_resamples_whole_prompts():
    every_pair = np.array([1.0] * 8 + [0.0] * 8)  # two prompts of 8 pairs: one all wins, one all losses
    # two prompts cannot tell 0.5 from either extreme
    assert evaluate.win_rate_interval(every_pair, per_prompt=8, seed=0) == {"low": 0.0, "high": 1.0}
    mixed = np.tile([1.0, 0.0], 8)  # the same pairs spread evenly over the two prompts
    assert evaluate.win_rate_interval(mixed, per_prompt=8, seed=0) == {"low": 0.5, "high": 0.5}
    many = np.tile(np.array([1.0] * 8 + [0.0] * 8), 24)  # 48 such prompts: a narrower interval around 0.5
    interval = evaluate.win_rate_interval(many, per_prompt=8, seed=0)
    assert 0.3 < interval["low"] < 0.5 < interval["high"] < 0.7


def test_win_rate_by_judge_splits_pairs_by_the_change_in_verdict():
    wins = np.array([1.0, 0.0, 1.0, 0.5, 0.0])
    production = np.array([False, True, True, False, True])
    candidate = np.array([True, False, True, False, True])
    assert evaluate.win_rate_by_judge(wins, production, candidate) == {
        "improved": {"pairs": 1, "win_rate": 1.0}, "unchanged": {"pairs": 3, "win_rate": 0.5},
        "worsened": {"pairs": 1, "win_rate": 0.0}}
    assert evaluate.win_rate_by_judge(wins[2:], production[2:], candidate[2:])["improved"] == {
        "pairs": 0, "win_rate": None}


def test_same_seeds_make_production_against_itself_a_draw(tuned):
    pipe = models.load_pipeline(tuned.path("models/base"))
    from components.sampling import SamplerConfig

    config = SamplerConfig(steps=3)
    a = evaluate.draw(pipe, ["one red circle on a white background"], ["x"], 2, 0, config)
    b = evaluate.draw(pipe, ["one red circle on a white background"], ["x"], 2, 0, config)
    assert np.array_equal(a, b) and evaluate.distance(a, b).max() == 0
    assert evaluate.nearest_distance(a, np.concatenate([b, b]))[0] == 0


def _metrics(**changes) -> dict:
    metrics = {"candidate": "c", "production": "p", "reward": {"win_rate": 0.6, "gain": 0.01},
               "diversity": {"drop": 0.1}, "memorization": {"near_copy_rate": 0.0}, "judge": {"gain": 0.05}}
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        metrics[section][key] = value
    return metrics


@pytest.mark.parametrize("changes, line", [
    ({"reward.win_rate": 0.41}, "win rate 0.410 < 0.5 (gate.min_win_rate)"),
    ({"reward.win_rate": 0.458, "reward.win_rate_interval": {"low": 0.354, "high": 0.563}},
     "win rate 0.458 < 0.5 (gate.min_win_rate); 95% interval over prompts 0.35–0.56"),
    ({"reward.gain": -0.02}, "reward gain -0.0200 < 0 (gate.min_reward_gain)"),
    ({"diversity.drop": 0.5}, "diversity drop 0.500 > 0.25 (gate.max_diversity_drop)"),
    ({"memorization.near_copy_rate": 0.2}, "near-copy rate 0.200 > 0.05 (gate.max_memorization_rate)"),
    ({"judge.gain": -0.1}, "judge alignment gain -0.100 < 0 (gate.min_judge_gain)"),
])
def test_gate_names_each_failed_criterion(changes, line):
    assert gate.decide(_metrics(), GateParams(), "world")["passed"]
    decision = gate.decide(_metrics(**changes), GateParams(), "world")
    assert not decision["passed"] and decision["failures"] == [line]


def test_failed_gate_keeps_production_and_says_why(tuned, capsys):
    evaluate.evaluate(tuned)
    strict = tuned.params.model_copy(update={"gate": GateParams(min_reward_gain=2.0)})
    import dataclasses

    decision = gate.gate(dataclasses.replace(tuned, params=strict))
    assert not decision["passed"]
    assert cli(["--project", str(tuned.root), "promote"]) == 1
    err = capsys.readouterr().err
    assert "the gate did not pass; production stays" in err and "gate.min_reward_gain" in err
    assert not tuned.path(models.PRODUCTION_POINTER).exists()
    assert models.resolve(tuned, "production") == tuned.path("models/base")


def _draw(pipe):
    from components.sampling import SamplerConfig, sample

    return sample(pipe, ["two red circles on a white background"], [5], SamplerConfig(steps=3), record=False).images


def test_promotion_registers_tags_and_serves_production(tuned, capsys, tmp_path):
    evaluate.evaluate(tuned)
    lenient = tuned.params.model_copy(update={"gate": GateParams(min_win_rate=0, min_reward_gain=-1,
                                                                   max_diversity_drop=1, min_judge_gain=-1)})
    import dataclasses

    assert gate.gate(dataclasses.replace(tuned, params=lenient))["passed"]
    candidate_images = _draw(models.load_pipeline(tuned.path("models/candidate")))

    build = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tuned.root, capture_output=True, text=True).stdout.strip()
    assert cli(["--project", str(tuned.root), "promote"]) == 0
    assert "promoted policy@v1" in capsys.readouterr().out
    card = json.loads(tuned.path("models/production/card.json").read_text())
    assert card["method"] == "d3po" and card["prompts_hash"] and card["labels_hash"] and card["code_commit"] == build
    version_dir = tuned.path("models/registry/v1")
    assert (version_dir / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((version_dir / "candidate.json").read_text())["base"] == "../../base"
    assert "# policy@v1" in (version_dir / "model_card.md").read_text()
    tags = subprocess.run(["git", "tag"], cwd=tuned.root, capture_output=True, text=True).stdout.split()
    assert tags == ["policy@v1"]
    tagged = subprocess.run(["git", "rev-list", "-n1", "policy@v1"], cwd=tuned.root, capture_output=True,
                            text=True).stdout.strip()
    assert tagged == build  # the tag marks the commit the model was built from
    promotion = subprocess.run(["git", "show", "--name-only", "--format=", "HEAD"], cwd=tuned.root,
                               capture_output=True, text=True).stdout.split()
    assert set(promotion) >= {"models/production.dvc", "models/registry.dvc", "models/production.json",
                              "models/registry.json"}

    production = models.load_pipeline(models.resolve(Project.load(tuned.root), "production"))
    served = _draw(production)
    assert np.abs(served.astype(int) - candidate_images).max() <= 1
    by_tag = models.load_pipeline(models.resolve(Project.load(tuned.root), "policy@v1"))
    assert np.abs(_draw(by_tag).astype(int) - candidate_images).max() <= 1
    with pytest.raises(UserError, match=r"policy@v9: no such registered model \(registered: policy@v1\)"):
        models.resolve(tuned, "policy@v9")

    assert cli(["--project", str(tuned.root), "models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["tag"], r["production"]) for r in rows] == [("v1", "policy@v1", True)]

    with pytest.raises(UserError, match="re-run `dvc repro gate`"):
        (tuned.path("models/candidate") / "candidate.json").write_text(
            (tuned.path("models/candidate") / "candidate.json").read_text().replace('"d3po"', '"edited"'))
        registry.promote(tuned)
