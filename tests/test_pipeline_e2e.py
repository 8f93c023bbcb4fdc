"""End to end: the repository's dvc.yaml, reproduced through the Prefect flow on tiny settings."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components import live
from tests import prefect_ui
from tests.conftest import REPO, run


def _tiny(params: dict) -> None:
    from tests.models import TINY_WORLD

    params["world"].update(TINY_WORLD)
    params["pretrain_vae"].update(steps=3, batch_size=8, judge_images=8, checkpoint_every=2)
    params["pretrain_clip"].update(steps=3, batch_size=8, checkpoint_every=2)
    params["pretrain"].update(steps=4, batch_size=8, warmup_steps=1, probe_every=2, checkpoint_every=2)
    params["sample"]["steps"] = 3
    params["evaluate_base"]["images_per_composition"] = 1
    params["generate"].update(images_per_prompt=2, batch_size=16, splits=["eval"])


def repo_project(stack_project, root, edit) -> Path:
    """A committed git + DVC project with this repository's stage graph and code, on the session's services."""
    from components.dvc_remote import configure_remote
    from components.project import Project
    from tests.conftest import sibling_project

    root = sibling_project(stack_project, root, edit=edit)
    for name in ("dvc.yaml", ".gitignore", "models/production.json"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    for folder in ("components", "prompts"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for args in (["git", "init", "-q"], ["git", "config", "user.email", "ci@example.org"],
                 ["git", "config", "user.name", "ci"], [sys.executable, "-m", "dvc", "init", "-q"],
                 ["git", "add", "-A"], ["git", "commit", "-q", "-m", "project"]):
        run(args, root)
    configure_remote(Project.load(root))
    return root


@pytest.fixture
def pipeline_project(stack_project, tmp_path):
    return repo_project(stack_project, tmp_path / "pipeline", _tiny)


@pytest.mark.slow
def test_reproduce_builds_every_stage_then_does_nothing(pipeline_project, prefect_api):
    from flows.pipeline import reproduce

    # the first run as a user starts it, to read what they read
    shown = run([sys.executable, "-m", "flows.cli", "--project", str(pipeline_project), "run", "reproduce"],
                pipeline_project)
    log, result = shown.stdout[:shown.stdout.rindex("\n{\n") + 1], shown.stdout[shown.stdout.rindex("\n{\n") + 1:]
    first = json.loads(result)
    lines = [re.sub(r"^\d\d:\d\d:\d\d\.\d+ \| ", "", line).strip()
             for line in (log + shown.stderr).splitlines() if line.strip()]
    assert [line for line in set(lines) if lines.count(line) > 1] == []  # nothing said twice
    for stage in first["stages_run"]:
        assert sum(line.endswith(f" - {stage}: started") for line in lines) == 1, lines
        assert sum(f" - {stage}: done in " in line for line in lines) == 1, lines
    noise = ("To track the changes with git", "To enable auto staging", "Writing model shards",
             "Loading pipeline components", "Loading weights", "`Trainer.fit` stopped", "Tip:", "Warning:")
    assert [line for line in lines if line.startswith(noise) or any(n in line for n in noise)] == []
    world = {"pretrain_vae", "pretrain_clip", "pretrain"}
    assert set(first["stages_run"]) == {"curate", *world, "evaluate_base", "generate"}
    # the retrain stages wait for the first label snapshot
    assert first["skipped"] == dict.fromkeys(["validate", "train_reward", "finetune", "evaluate", "gate"],
                                             "data/labels")
    assert first["pushed"] > 0

    root = pipeline_project
    assert (root / "models" / "base" / "model_index.json").exists()
    # the base is the same bytes wherever the project lives (its version names its generations)
    assert not [p for p in (root / "models" / "base").rglob("*.json") if str(root) in p.read_text()]
    metrics = json.loads((root / "reports" / "base_metrics.json").read_text())
    assert set(metrics) == {"seen", "unseen"}
    assert metrics["seen"]["images"] == 72 and metrics["unseen"]["images"] == 24
    assert {"aligned", "count", "colour", "shape", "background"} <= set(metrics["seen"])
    # DVCLive's curves: a row per step, the probes and sample grids where they ran
    assert live.curve(root, "pretrain", "loss")["step"].tolist() == [1, 2, 3, 4]
    assert len(live.curve(root, "pretrain", "align_seen")) == 2
    grids = sorted(p.name for p in (live.live_dir(root, "pretrain") / live.IMAGES / "samples").iterdir())
    assert grids == [f"{step}.png" for step in live.curve(root, "pretrain", "align_seen")["step"]]
    manifest = pd.read_parquet(root / "data" / "generations.parquet")
    assert len(manifest) == 24 * 2

    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"curate", *world, "evaluate_base", "generate"}

    second = reproduce(root=str(pipeline_project))
    assert second["stages_run"] == []
    assert yaml.safe_load((root / "dvc.lock").read_text()) == lock

    # a failing stage's own one-line reason, not only DVC's exit code, is the flow's message
    params_text = (root / "params.yaml").read_text()
    params = yaml.safe_load(params_text)
    params["curate"]["sources"] = ["world", "prompts/extra.csv"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "prompts").mkdir(exist_ok=True)
    (root / "prompts" / "extra.csv").write_text("text\nthree red squares\n")
    try:
        state = reproduce(root=str(pipeline_project), return_state=True)
    finally:
        (root / "params.yaml").write_text(params_text)
        (root / "prompts" / "extra.csv").unlink()
    assert state.is_failed()
    assert "failed to reproduce 'curate': curate: error: " in state.message
    assert "extra.csv:1: no 'prompt' column (found: text)" in state.message
    # DVC removed the stage's outputs before running it; the message says how to get them back
    assert "`dvc checkout` restores them" in state.message
    assert not (root / "data" / "prompts.parquet").exists()
    run([sys.executable, "-m", "dvc", "checkout", "curate"], root)
    assert (root / "data" / "prompts.parquet").exists()


@pytest.mark.slow
def test_generate_flow_makes_shards_as_parallel_tasks_then_merges(pipeline_project, prefect_api):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import generate, reproduce

    state = generate(root=str(pipeline_project), shards=3, push_outputs=False, return_state=True)
    result = state.result()
    assert result["shards"] == 3 and {"curate", "pretrain", "generate"} <= set(result["stages_run"])
    assert len(pd.read_parquet(pipeline_project / "data" / "generations.parquet")) == 24 * 2

    async def task_runs():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))

    shards = {t.name: t.state.type.value for t in asyncio.run(task_runs()) if t.name.startswith("generate shard")}
    assert shards == {f"generate shard {i}/3": "COMPLETED" for i in (1, 2, 3)}
    # the merged manifest is the stage's output: nothing left to rebuild
    assert "generate" not in reproduce(root=str(pipeline_project), push_outputs=False)["stages_run"]


def _retrain_settings(params: dict) -> None:
    _tiny(params)
    params["generate"].update(images_per_prompt=4, shared_noise_group=2, splits=["train", "eval"], batch_size=64)
    # a 4-step base draws nothing the judge calls aligned: no class balance, pairs for the reward
    params["validate"].update(min_labels=50, min_agreement=0.0, min_good_share=0.0)
    params["reward"].update(kind="bradley_terry", steps=10, batch_size=16)
    params["finetune"]["method"] = "d3po"  # the method that replays Label Studio's pairs' trajectories
    params["finetune"]["d3po"].update(epochs=1, pairs_per_batch=8, timestep_fraction=0.34)
    params["finetune"]["diffusion_dpo"].update(steps=3, pairs_per_batch=8)
    params["evaluate"].update(max_prompts=4, images_per_prompt=2)
    # a random tiny model cannot beat itself on purpose: let any candidate through
    params["gate"].update(min_win_rate=0.0, min_reward_gain=-1.0, max_diversity_drop=1.0, min_judge_gain=-1.0)
    params["retrain"]["min_new_labels"] = 100


@pytest.mark.slow
def test_label_studio_round_then_retrain_promotes_a_tagged_model(stack_project, tmp_path, prefect_api):
    """generate → Label Studio round (simulated annotators) → sync → retrain flow → policy@v1."""
    from components.annotation import rounds
    from components.dvc_remote import dvc_env
    from components.project import Project
    from flows.loop import annotation_round, sync_annotations
    from flows.pipeline import reproduce, retrain

    root = repo_project(stack_project, tmp_path / "loop", _retrain_settings)
    project = Project.load(root)
    reproduce(root=str(root))

    assert retrain(root=str(root))["ran"] is False  # no labels yet
    pushed = annotation_round(root=str(root), limit=60, simulated=True)
    assert {k: v["created"] for k, v in pushed["pushed"].items()} == {"binary": 60, "pairwise": 60}
    synced = sync_annotations(root=str(root))
    assert synced["binary"]["new"] == 60 * 3 and synced["pairwise"]["new"] == 60 * 3
    assert rounds.new_labels(project) == 360

    # a failed validation stops the flow with the failed expectation as its message
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["validate"]["min_labels"] = 10**6
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    state = retrain(root=str(root), return_state=True)
    assert state.is_failed()
    assert "labels: labels 360 < 1e+06 (validate.min_labels)" in state.message
    assert json.loads((root / "models" / "production.json").read_text())["model"] == "base"
    params["validate"]["min_labels"] = 50
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    state = retrain(root=str(root), return_state=True)
    result = state.result()
    assert result["ran"] and result["gate"]["passed"], result["gate"]
    assert {"validate", "train_reward", "finetune", "evaluate", "gate"} <= set(result["stages_run"])
    # the Prefect UI shows each DVC stage as a task run of its own, named after it
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def task_names():
        async with get_client() as client:
            return [t.name for t in await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))]

    assert {"validate", "train_reward", "finetune", "evaluate", "gate"} <= set(asyncio.run(task_names()))
    assert result["promoted"]["tag"] == "policy@v1" and result["commit"]
    tags = run(["git", "tag"], root).stdout.split()
    assert tags == ["policy@v1"]
    committed = run(["git", "show", "--name-only", "--format=", result["commit"]], root).stdout.split()
    assert "dvc.lock" in committed and "data/labels.dvc" in committed
    assert rounds.new_labels(project) == 0

    # what a reviewer sees: the run in the Prefect UI, its report artifact with the decision
    seen = prefect_ui.capture_flow_run_report(prefect_api, stack_project.credentials.prefect_auth, "retrain",
                                              "retrain-report", "promoted: policy@v1")
    assert seen["run"]["state_type"] == "COMPLETED" and "/artifacts/artifact/" in seen["report_url"]
    grids = [width for alt, width in seen["images"] if "candidate" in alt]
    assert grids and all(width > 0 for width in grids), seen["images"]  # the image grid shows in the UI
    assert all(shot.stat().st_size > 10_000 for shot in seen["screenshots"].values())

    assert retrain(root=str(root))["ran"] is False

    # the next round is online and on-policy: it samples policy@v1, pushes only its images
    # (the base's stay in the manifest with their labels), and D3PO starts from v1 on them
    from components.annotation.snapshot import load_stores
    from flows.loop import online_rounds

    v1 = json.loads((root / "models" / "production.json").read_text())["model_version"]
    state = online_rounds(root=str(root), rounds=1, kinds=["pairwise"], limit=40, simulated=True, return_state=True)
    [summary] = state.result()
    assert summary["pushed"] == {"pairwise": 40} and summary["promoted"]["tag"] == "policy@v2"
    made_by = pd.read_parquet(root / "data" / "generations.parquet").set_index("generation_id")["model_version"]
    annotations, _ = load_stores(project.state_dir)
    versions = annotations["generation_ids"].map(lambda ids: made_by[list(ids)].unique().tolist())
    assert (versions.map(len) == 1).all() and (versions.str[0] == v1).sum() == 40 * 3
    tuned = json.loads((root / "reports" / "finetune.json").read_text())
    assert tuned["base_version"] == v1 and tuned["data"]["pairs_of_other_models"] > 0
    # the run shows the round's chain: annotation_round → sync_annotations → retrain
    from prefect.client.schemas.filters import FlowRunFilterParentFlowRunId

    async def subflows():
        async with get_client() as client:
            children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
            flows = {f.id: f.name for f in await client.read_flows()}
            return [flows[c.flow_id] for c in sorted(children, key=lambda c: c.start_time)]

    assert asyncio.run(subflows()) == ["annotation_round", "sync_annotations", "retrain"]

    # two retrains started together both finish (the DVC repo lock queues them); the repo is consistent
    # (each thread runs in a copy of this context: Prefect's settings, the test server's API URL, are context-local).
    # An off-policy method: D3PO from v2 has no labelled pair of v2's yet (it would refuse, in one line).
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    params["finetune"]["method"] = "diffusion_dpo"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with ThreadPoolExecutor(2) as pool:
        states = list(pool.map(lambda context: context.run(retrain, root=str(root), force=True, return_state=True),
                               [contextvars.copy_context() for _ in range(2)]))
    assert all(s.is_completed() for s in states), [s.message for s in states]
    # every output still matches dvc.lock (a promotion only makes generate and what follows due)
    status = json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], root, env=dvc_env(project)).stdout)
    assert not [stage for stage, changes in status.items()
                if any("changed outs" in c for c in changes if isinstance(c, dict))], status

    # `git checkout policy@vN && dvc pull && dvc repro` rebuilds the model: every output's md5
    # in dvc.lock comes out the same when every stage is forced to run again at the tag

    run(["git", "checkout", "-q", "policy@v1"], root)
    assert json.loads((root / "models" / "production.json").read_text())["model"] == "base"
    run([sys.executable, "-m", "dvc", "pull", "-q"], root, env=dvc_env(project))
    lock = (root / "dvc.lock").read_text()
    run([sys.executable, "-m", "dvc", "repro", "--force", "-q"], root, env=dvc_env(project))
    assert (root / "dvc.lock").read_text() == lock

    # an experiment over params, as DVC users queue them: only the stages downstream of the
    # changed param run, and `dvc exp show` lists it with its params and metrics
    run([sys.executable, "-m", "dvc", "exp", "run", "-S", "finetune.method=diffusion_dpo", "-n", "dpo"], root,
        env=dvc_env(project))
    shown = json.loads(run([sys.executable, "-m", "dvc", "exp", "show", "--json"], root, env=dvc_env(project)).stdout)
    experiments = {e["name"]: e["revs"][0]["data"] for b in shown for e in (b.get("experiments") or [])}
    assert set(experiments) == {"dpo"}, experiments
    exp = experiments["dpo"]
    assert exp["params"]["params.yaml"]["data"]["finetune"]["method"] == "diffusion_dpo"
    assert exp["metrics"]["reports/finetune.json"]["data"]["method"] == "diffusion_dpo"
    assert exp["metrics"]["reports/live/finetune/metrics.json"]["data"]["step"] == 3  # DVCLive's summary
    assert "passed" in exp["metrics"]["reports/gate.json"]["data"]
