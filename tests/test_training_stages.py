"""train_reward and finetune stages on a tiny world model, generations in the real embedded S3."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from components import curate, feedback, generate, live, models
from components.annotation import oracle
from components.annotation.simulate import AnnotatorConfig
from components.errors import UserError
from components.finetune import stage as finetune_stage
from components.project import Project
from components.reward import train as reward_train
from components.sampling import encode_prompts
from components.reward.model import ClipRewardScorer, load_scorer
from tests.conftest import last_checkpoint_step, sibling_project
from tests.models import save_tiny_world_model

METHODS = ["d3po", "prdp", "reward_weighted", "diffusion_dpo"]


def _tiny(params: dict, method: str = "d3po") -> None:
    params["sample"]["steps"] = 3
    params["generate"].update(images_per_prompt=4, shared_noise_group=2, batch_size=64, splits=["train"])
    params["reward"].update(steps=15, batch_size=16)
    ft = params["finetune"]
    ft.update(method=method, init="base", checkpoint_every=1)
    ft["d3po"].update(epochs=1, pairs_per_batch=4, timestep_fraction=0.34, lr=1e-4)
    ft["prdp"].update(epochs=2, prompts_per_epoch=2, images_per_prompt=2, updates_per_epoch=1)
    ft["reward_weighted"].update(epochs=1, batch_size=8)
    ft["diffusion_dpo"].update(steps=3, pairs_per_batch=4)


def _project(stack_project, root, **edits) -> Project:
    def edit(params):
        _tiny(params)
        for dotted, value in edits.items():
            node = params
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value

    root = sibling_project(stack_project, root, edit=edit)
    save_tiny_world_model(root / "models" / "base", clip_dir=root / "models" / "clip")
    return generate_and_label(root)


def generate_and_label(root) -> Project:
    """Curate the world's prompts, generate with the project's model, and label the images
    with the simulated annotators."""
    curate.run(root)
    project = Project.load(root)
    generate.run(project)
    gens = feedback.generations(root)
    images = feedback.Fetcher(project.object_store()).images(list(gens["image_key"]))
    tasks, prefs = oracle.label(gens, dict(zip(gens.index, images)), AnnotatorConfig(coverage=3, flip_rate=0.1))
    # a random tiny model rarely draws a fully aligned image: make a few binary verdicts "good"
    binary = tasks.index[tasks["kind"] == "binary"]
    tasks.loc[binary[::5], "majority"] = "good"
    from components.annotation.snapshot import preferences

    oracle.write(tasks, preferences(tasks), root / "data" / "labels")
    return project


@pytest.fixture(scope="module")
def labelled(stack_project, tmp_path_factory):
    return _project(stack_project, tmp_path_factory.mktemp("training") / "project")


def test_lee_reward_trains_reports_metrics_and_round_trips(labelled):
    metrics = reward_train.train_reward(labelled.params, labelled.root, labelled.object_store())
    assert metrics["kind"] == "lee" and metrics["ensemble"] == 3
    assert metrics["validation"]["n"] > 0 and metrics["train_rows"] > 0
    assert {"accuracy", "auc", "calibration_error"} <= set(metrics["validation"])
    assert "judge_on_unseen_prompts" in metrics
    assert json.loads(labelled.path(reward_train.METRICS_OUT).read_text()) == metrics
    curve = live.curve(labelled.root, "train_reward", "loss")
    assert curve["step"].tolist() == list(range(1, 16)) and curve["loss"].notna().all()

    saved = load_file(labelled.path(reward_train.MODEL_OUT) / "diffusion_pytorch_model.safetensors")
    assert saved and all(k.startswith(("mlp.", "out.")) for k in saved)  # the heads only: the world CLIP is frozen
    assert json.loads(labelled.path(reward_train.MODEL_OUT / "config.json").read_text())["clip"] == "models/clip"

    scorer = load_scorer(labelled, labelled.path(reward_train.MODEL_OUT))
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    prompts = ["one red circle on a white background"] * 3
    mean, spread = scorer.score(images, prompts)
    assert mean.shape == (3,) and ((0 <= mean) & (mean <= 1)).all() and (spread >= 0).all()
    again = load_scorer(labelled, labelled.path(reward_train.MODEL_OUT)).score(images, prompts)[0]
    assert np.array_equal(mean, again)


def test_prompt_classification_scores_the_original_prompt_with_the_network(labelled):
    """The original prompt's reward gets gradient (not a constant logit, as in one reimplementation)."""
    from components.config import RewardParams

    scorer = ClipRewardScorer.create(labelled.params, labelled.root, heads=1)
    images = torch.zeros(2, 3, 32, 32)
    prompts = ["two red circles on a white background", "one blue square on a black background"]
    module = reward_train.RewardModule(scorer, RewardParams(perturbed_prompts=3), 0, images, prompts,
                                       labels=torch.ones(2))
    seen_prompts = []
    original = scorer.logits

    def spy(x, ps):
        seen_prompts.extend(ps)
        return original(x, ps)

    scorer.logits = spy
    loss = module.prompt_classification([0, 1], torch.ones(2), torch.ones(2, 1))
    assert prompts[0] in seen_prompts and prompts[1] in seen_prompts
    assert len(seen_prompts) == 2 * 4 and float(loss) > 0
    loss.backward()
    assert scorer.model.out.weight.grad.abs().sum() > 0


def test_the_old_world_cnn_reward_is_refused_with_how_to_rebuild_it(labelled, tmp_path):
    """A models/reward from before the world had a CLIP (a CNN's config and weights)."""
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "RewardModel", "vocab_size": 32, "heads": 3}))
    save_file({"words.weight": torch.zeros(32, 32)}, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError, match=r"not a reward model of this version .*dvc repro train_reward") as err:
        load_scorer(labelled, tmp_path)
    assert "\n" not in str(err.value)


def test_bradley_terry_reward_learns_from_pairs(labelled):
    params = labelled.params.model_copy(update={"reward": labelled.params.reward.model_copy(
        update={"kind": "bradley_terry"})})
    metrics = reward_train.train_reward(params, labelled.root, labelled.object_store())
    assert metrics["kind"] == "bradley_terry" and metrics["validation"]["n"] > 0
    assert 0 <= metrics["validation"]["pair_accuracy"] <= 1 and 0 <= metrics["validation"]["tied"] <= 1


def test_bradley_terry_rewards_stay_centred_and_unsaturated(labelled, tmp_path):
    """Pairs fix only logit differences; trained long, uncentred logits drift until the
    sigmoid rounds most rewards to exactly 0 or 1 and every comparison ties."""
    root = shutil.copytree(labelled.root, tmp_path / "project", ignore=shutil.ignore_patterns("models"))
    shutil.copytree(labelled.path("models/clip"), root / "models" / "clip")
    params = labelled.params.model_copy(update={"reward": labelled.params.reward.model_copy(
        update={"kind": "bradley_terry", "steps": 400, "lr": 3e-2, "ensemble": 1})})
    reward_train.train_reward(params, root, labelled.object_store())
    import dataclasses

    scorer = load_scorer(dataclasses.replace(labelled, root=root, params=params), root / reward_train.MODEL_OUT)
    gens = feedback.generations(labelled.root)
    images = feedback.Fetcher(labelled.object_store()).images(list(gens["image_key"]))
    rewards, _ = scorer.score(images, list(gens["prompt"]))
    assert ((rewards == 0) | (rewards == 1)).mean() < 0.02  # 6% here without the centring
    assert abs(np.log(rewards / (1 - rewards)).mean()) < 2.0  # 0.05 here; infinite without


def test_gpu_profiles_train_reward_heads_on_a_frozen_clip(labelled, tmp_path):
    """sd15's reward (Lee et al.): heads on the CLIP of models.clip, which stays frozen and
    out of the saved model; the stages load it through models.clip, and refuse another CLIP."""
    import dataclasses

    from components.config import parse_params
    from tests.models import save_tiny_clip

    clip_dir = save_tiny_clip(tmp_path / "clip")
    clip_before = load_file(clip_dir / "model.safetensors")
    root = tmp_path / "sd15"
    shutil.copytree(labelled.path("data"), root / "data")  # the world's labelled generations, scored by CLIP
    data = labelled.params.model_dump(by_alias=True)
    data.update(profile="sd15")
    data["models"].update(sd15={"path": "sd15-weights"}, clip={"path": str(clip_dir)})
    data["reward"].update(steps=40)
    project = dataclasses.replace(labelled, root=root, params=parse_params(data))

    metrics = reward_train.train_reward(project.params, root, labelled.object_store())
    assert metrics["kind"] == "lee" and metrics["validation"]["n"] > 0 and "judge_on_unseen_prompts" not in metrics
    saved = load_file(root / reward_train.MODEL_OUT / "diffusion_pytorch_model.safetensors")
    assert saved and all(k.startswith(("mlp.", "out.")) for k in saved)  # the heads only
    after = load_file(clip_dir / "model.safetensors")
    assert all(torch.equal(clip_before[k], after[k]) for k in clip_before)

    scorer = load_scorer(project, root / reward_train.MODEL_OUT)
    assert isinstance(scorer, ClipRewardScorer)
    gens = feedback.generations(root)
    labels = feedback.binary_labels(root, gens)
    scores = scorer.score(feedback.Fetcher(labelled.object_store()).images(list(gens.loc[labels["generation_id"], "image_key"])),
                          list(labels["prompt"]))[0]
    good = labels["label"].mean()  # the heads learned the labels' base rate, from 0.5 at initialisation
    assert abs(scores.mean() - good) < 0.5 * abs(0.5 - good)
    images = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)  # any size: CLIP resizes
    mean, spread = scorer.score(images, ["two red circles on a white background"] * 3)
    assert mean.shape == (3,) and ((0 <= mean) & (mean <= 1)).all() and spread.shape == (3,)

    other = shutil.copytree(clip_dir, tmp_path / "another-clip")
    data["models"]["clip"] = {"path": str(other)}
    moved = dataclasses.replace(project, params=parse_params(data))
    with pytest.raises(UserError, match=r"trained on CLIP .*/clip, but models.clip is now .*another-clip"):
        load_scorer(moved, root / reward_train.MODEL_OUT)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_fine_tunes_into_a_loadable_candidate(labelled, method):
    import dataclasses

    if not labelled.path(reward_train.MODEL_OUT).exists():
        reward_train.train_reward(labelled.params, labelled.root, labelled.object_store())
    params = labelled.params.model_copy(update={"finetune": labelled.params.finetune.model_copy(
        update={"method": method})})
    project = dataclasses.replace(labelled, params=params)
    report = finetune_stage.finetune(project)
    assert report["method"] == method and report["steps"] > 0 and report["final"]["step"] == report["steps"]
    out = project.path(finetune_stage.CANDIDATE_OUT)
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((out / "candidate.json").read_text())["method"] == method
    pipe = models.load_pipeline(out)
    base = models.load_pipeline(project.path("models/base"))
    cond = encode_prompts(base, ["two red circles on a white background"])[0].embeds
    tuned_out = pipe.unet(torch.zeros(1, 4, 8, 8), 500, cond).sample
    base_out = base.unet(torch.zeros(1, 4, 8, 8), 500, cond).sample
    assert not torch.equal(tuned_out, base_out)
    curve = live.curve(project.root, "finetune", "loss")
    assert curve["step"].tolist() == list(range(1, report["steps"] + 1)) and curve["loss"].notna().all()
    grids = live.live_dir(project.root, "finetune") / live.IMAGES / "samples"
    assert [p.name for p in grids.iterdir()] == [f"{report['steps']}.png"]  # fewer steps than sample_grid_every
    assert not list((project.state_dir / "checkpoints" / "finetune").glob("*/last.ckpt"))


def test_d3po_batches_hold_whole_x_t_groups_and_every_pair_once_an_epoch():
    groups = np.array(["a", "b", "a", "c", "c", "a", "d"])  # the x_T group of each of 7 pairs
    batches = finetune_stage.group_schedule(groups, pairs_per_batch=2, epochs=2, seed=0)
    epochs, seen = [], []
    for batch in batches:
        assert all(set(np.flatnonzero(groups == g)) <= set(batch) for g in set(groups[batch]))
        seen += batch.tolist()
        if len(seen) == len(groups):
            epochs.append(seen)
            seen = []
        else:
            assert len(batch) >= 2  # only an epoch's last batch may be short
    assert len(epochs) == 2 and all(sorted(e) == list(range(7)) for e in epochs) and epochs[0] != epochs[1]
    # one pair per group (pairs of two images): the plain per-pair schedule
    singles = finetune_stage.group_schedule(np.arange(7), pairs_per_batch=3, epochs=2, seed=0)
    expected = finetune_stage.epoch_schedule(7, 3, 2, seed=0)
    assert [b.tolist() for b in singles] == [b.tolist() for b in expected]


def test_d3po_without_pairs_sharing_x_t_fails_in_one_line_and_writes_nothing(stack_project, labelled, tmp_path):
    root = sibling_project(stack_project, tmp_path / "unshared", edit=_tiny)
    save_tiny_world_model(root / "models" / "base")
    shutil.copytree(labelled.path("data"), root / "data")
    gens = pd.read_parquet(root / feedback.GENERATIONS)
    gens["init_seed"] = gens["seed"]  # as if sampled with generate.shared_noise_group: 1
    gens.to_parquet(root / feedback.GENERATIONS)
    result = subprocess.run([sys.executable, "-m", "components.finetune.stage"], cwd=root, capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr  # above the error only the base model's loading bars
    assert result.stderr.strip().splitlines()[-1] == (
        "finetune: error: data/labels/preferences.parquet: no labelled pair of train generations shares its initial "
        "noise; D3PO needs pairwise labels on images generated with generate.shared_noise_group ≥ 2")
    assert not (root / "models" / "candidate").exists() and not (root / "reports").exists()


def _promote_a_lora(project: Project) -> str:
    """Production becomes policy@v1, a LoRA on the base that changes its images, promoted
    by the registry (the gate's pass is written by hand: the gate is test_gate_decisions')."""
    from components import registry
    from components.config import LoraParams
    from components.finetune.core import attach_policy, save_candidate

    tuned = models.load_pipeline(project.path("models/base"))
    attach_policy(tuned, LoraParams())
    with torch.no_grad():  # a LoRA starts as a no-op (B = 0): give it an effect
        for name, param in tuned.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    candidate = project.path("models/candidate")
    save_candidate(tuned, candidate, LoraParams(), "../base", {"method": "d3po"})
    version = models.model_version(candidate)
    (project.root / "reports").mkdir(exist_ok=True)
    (project.root / "reports" / "gate.json").write_text(json.dumps({"candidate": version, "passed": True,
                                                                    "failures": [], "checked": []}))
    (project.root / "reports" / "evaluation.json").write_text(json.dumps({"diversity": {"drop": 0.0},
                                                                          "memorization": {"near_copy_rate": 0.0}}))
    registry.promote(project, commit=False)
    return version


def _label(project: Project, gens: pd.DataFrame) -> None:
    images = feedback.Fetcher(project.object_store()).images(list(gens["image_key"]))
    tasks, prefs = oracle.label(gens, dict(zip(gens.index, images)), AnnotatorConfig(coverage=3, flip_rate=0.1))
    oracle.write(tasks, prefs, project.root / "data" / "labels")


def test_generation_and_d3po_are_on_policy_after_a_promotion(stack_project, tmp_path):
    """After policy@v1 is promoted, generate samples it and keeps the base's generations
    (their labels stay valid); a round labels only v1's; D3PO, starting from v1, refuses
    pairs the base sampled and trains on v1's."""
    from components.annotation import rounds

    project = _project(stack_project, tmp_path / "onpolicy", **{"finetune.init": "production"})
    before = pd.read_parquet(project.path(generate.MANIFEST_OUT))
    v1 = _promote_a_lora(project)
    assert models.version_of(project, "production") == models.version_of(project, "policy@v1") == v1

    # the labels are all on the base's pairs: D3PO from v1 refuses them, in one line
    with pytest.raises(UserError) as refused:
        finetune_stage.finetune(project)
    assert re.fullmatch(
        rf"data/labels/preferences.parquet: none of the \d+ labelled pairs was sampled by production \(model {v1}\), "
        rf"the model D3PO starts from \(they come from {before['model_version'].iloc[0]}\); D3PO learns on-policy: "
        r"label a round of its generations first \(`aligndiff run annotation_round`\)", str(refused.value))

    report = generate.run(project)
    after = pd.read_parquet(project.path(generate.MANIFEST_OUT))
    assert report["made_this_run"] == len(before)  # v1's only: the base's part comes back from the store
    assert report["models"] == {"base": before["model_version"].iloc[0], "policy@v1": v1}
    assert after.iloc[:len(before)].equals(before)  # the base's generations, so their labels, unchanged
    made_by_v1 = after.iloc[len(before):].reset_index(drop=True)
    assert (made_by_v1["model_version"] == v1).all()
    assert (made_by_v1["seed"].to_numpy() == before["seed"].to_numpy()).all()  # same seeds, another model:
    assert (made_by_v1["image_key"] != before["image_key"]).mean() > 0.5       # other images
    assert rounds.on_policy(project, after).reset_index(drop=True).equals(made_by_v1)

    gens = feedback.generations(project.root)
    _label(project, gens)  # both models' images labelled: D3PO takes v1's pairs only
    report = finetune_stage.finetune(project)
    assert report["data"]["pairs_of_other_models"] > 0  # the base's, left out
    assert report["base_version"] == v1 and report["data"]["pairs"] > 0


def test_d3po_on_step_level_pairs_trains_their_branch_step_alone(stack_project, tmp_path):
    project = _project(stack_project, tmp_path / "branch",
                       **{"generate.branch_step": 1, "finetune.d3po.timestep_fraction": 1.0})
    module, data = finetune_stage.build_d3po(project, models.load_pipeline(project.path("models/base")),
                                             feedback.generations(project.root),
                                             finetune_stage.usable_generations(feedback.generations(project.root),
                                                                               project.params),
                                             feedback.Fetcher(project.object_store()))
    assert data["trained_steps"] == [1] and data["pairs"] > 0
    trained = []
    pair_logits = module.pair_logits
    module.pair_logits = lambda pairs, step: trained.append(step) or pair_logits(pairs, step)
    module.training_step(None, 0).backward()
    assert trained == [1]  # not all three: timestep_fraction is 1


def test_missing_or_inconsistent_labels_fail_with_one_line_naming_the_file(stack_project, labelled, tmp_path):
    root = sibling_project(stack_project, tmp_path / "nolabels", edit=_tiny)
    (root / "data").mkdir()
    (root / "data" / "generations.parquet").write_bytes(labelled.path(feedback.GENERATIONS).read_bytes())
    result = subprocess.run([sys.executable, "-m", "components.reward.train"], cwd=root, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[0].startswith("train_reward: error: data/labels/tasks.parquet: not found")

    (root / "data" / "labels").mkdir()
    tasks = pd.read_parquet(labelled.path(feedback.TASKS))
    tasks.loc[0, "generation_ids"] = ["not-a-generation"]
    tasks.to_parquet(root / "data" / "labels" / "tasks.parquet")
    with pytest.raises(UserError, match=r"tasks.parquet: 1 generation ids not in data/generations.parquet"):
        feedback.binary_labels(root, feedback.generations(root))
    assert not (root / "models" / "reward").exists()


def test_killed_fine_tune_resumes_to_the_same_model(stack_project, tmp_path):
    from safetensors.torch import load_file

    edits = {"finetune.d3po.epochs": 3, "finetune.d3po.pairs_per_batch": 2, "finetune.checkpoint_every": 2}
    reference = _project(stack_project, tmp_path / "reference", **edits)
    finetune_stage.finetune(reference)
    expected = load_file(reference.path(finetune_stage.CANDIDATE_OUT) / "pytorch_lora_weights.safetensors")

    project = _project(stack_project, tmp_path / "killed", **edits)
    proc = subprocess.Popen([sys.executable, "-m", "components.finetune.stage"], cwd=project.root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = project.state_dir / "checkpoints" / "finetune"
    deadline = time.monotonic() + 300

    while time.monotonic() < deadline and last_checkpoint_step(checkpoints) < 4:
        assert proc.poll() is None, "finetune finished before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not project.path(finetune_stage.CANDIDATE_OUT).exists()

    rerun = subprocess.run([sys.executable, "-m", "components.finetune.stage"], cwd=project.root,
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "Restoring states from the checkpoint" in rerun.stdout + rerun.stderr
    # the output is about this run: no library's advert or deprecation of its own internals,
    # nor a warning about how our own code hands arrays to torch
    output = rerun.stdout + rerun.stderr
    assert "litlogger" not in output and "LeafSpec" not in output and "not writable" not in output
    # no terminal here, so progress comes as lines with counts and ETA, counted from the checkpoint;
    # the first line (one step: no rate yet) and the last (done) have no ETA
    progress = re.findall(r"^finetune \(d3po\): step (\d+)/(\d+) \(\d+%\), loss [\d.e-]+, \S+ elapsed(, ETA \S+)?$",
                          rerun.stdout, re.MULTILINE)
    assert len(progress) >= 3 and int(progress[0][0]) > 4 and not progress[0][2], rerun.stdout
    assert all(eta for _, _, eta in progress[1:-1]), rerun.stdout
    assert progress[-1][0] == progress[-1][1] and not progress[-1][2]
    resumed = load_file(project.path(finetune_stage.CANDIDATE_OUT) / "pytorch_lora_weights.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    # and so are its curves and grids, byte for byte: no row of the killed run twice, none missing
    curves = [live.live_dir(p.root, "finetune") for p in (reference, project)]
    files = [sorted(f.relative_to(c) for f in c.rglob("*") if f.is_file()) for c in curves]
    assert files[0] == files[1] and any(f.suffix == ".png" for f in files[0])
    assert all((curves[0] / f).read_bytes() == (curves[1] / f).read_bytes() for f in files[0])


def test_active_selection_pushes_the_tasks_the_ensemble_disagrees_on_most(labelled):
    from components.annotation import rounds

    if not labelled.path(reward_train.MODEL_OUT).exists():
        reward_train.train_reward(labelled.params, labelled.root, labelled.object_store())
    manifest = pd.read_parquet(labelled.path(feedback.GENERATIONS))
    candidates = rounds.candidate_tasks(manifest, "pairwise")
    scores = rounds.ensemble_disagreement(labelled, manifest, candidates)
    assert len(scores) == len(candidates) and (scores >= 0).all() and scores.std() > 0

    chosen = rounds.select_active(candidates, 10, scores, seed=0)
    assert len(chosen) == 10 and candidates[int(np.argmax(scores))] in chosen
    top10 = [candidates[i] for i in np.argsort(-scores)[:10]]
    # spread over prompts: never fewer distinct prompts than the plain top-10
    assert len({s.prompt for s in chosen}) >= len({s.prompt for s in top10})
    assert np.mean([scores[candidates.index(s)] for s in chosen]) > scores.mean()

    result = rounds.push_round(labelled, "pairwise", 2, 10, 0)  # auto: a reward model exists
    assert result["selection"] == "disagreement" and result["selected"] == 10 and result["created"] == 10
    assert result["expected_information"] > result["random_expected_information"]
    summaries = sorted((labelled.state_dir / "rounds").glob("*-push-pairwise.json"))
    assert json.loads(summaries[-1].read_text())["expected_information"] == result["expected_information"]


def test_active_selection_without_a_reward_model_says_how_to_get_one(stack_project, tmp_path):
    from components.annotation import rounds

    root = sibling_project(stack_project, tmp_path / "noreward", edit=_tiny)
    project = Project.load(root)
    with pytest.raises(UserError, match=r"models/reward: active selection needs a reward model"):
        rounds.ensemble_disagreement(project, pd.DataFrame(), [])
