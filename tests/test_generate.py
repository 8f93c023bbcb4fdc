"""The generate stage against the real embedded S3: manifest, objects, resume, sd15 path, sample CLI."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components import curate, generate, models
from components.errors import UserError
from components.project import Project
from flows.cli import main as cli
from components.sampling import timestep_pairs, to_images
from components.world.model import build_scheduler
from tests.conftest import sibling_project
from tests.models import save_tiny_stable_diffusion, save_tiny_world_model


def _settings(params, **generate_overrides):
    params["sample"]["steps"] = 3
    params["generate"].update({"images_per_prompt": 2, "shared_noise_group": 2, "batch_size": 8, "splits": ["eval"],
                               **generate_overrides})


def _world_project(stack_project, root, **generate_overrides):
    root = sibling_project(stack_project, root, edit=lambda p: _settings(p, **generate_overrides))
    save_tiny_world_model(root / "models" / "base")
    curate.run(root)
    return Project.load(root)


def test_generate_writes_manifest_and_content_addressed_objects(stack_project, tmp_path):
    project = _world_project(stack_project, tmp_path / "p")
    report = generate.run(project)
    manifest = pd.read_parquet(project.path(generate.MANIFEST_OUT))
    assert report["generations"] == len(manifest) == 24 * 2  # 24 eval prompts × 2 images
    assert list(manifest.columns) == generate.MANIFEST_COLUMNS
    assert manifest["generation_id"].is_unique
    assert (manifest["split"] == "eval").all()

    store = project.object_store()
    row = manifest.iloc[0]
    image = np.array(Image.open(io.BytesIO(store.get_bytes(row["image_key"]))))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    traj_bytes = store.get_bytes(row["trajectory_key"])
    traj = generate.load_trajectory(traj_bytes)
    assert traj["latents"].shape == (4, 4, 8, 8) and traj["log_probs"].shape == (3,)
    meta = generate.trajectory_metadata(traj_bytes)
    assert meta["generation_id"] == row["generation_id"] and meta["prompt"] == row["prompt"]
    assert traj["timesteps"].tolist() == timestep_pairs(build_scheduler(), 3)[0].tolist()
    assert traj["timesteps"][0] == 999  # "trailing" spacing starts from pure noise
    decoded = to_images(models.load_pipeline(project.path("models/base")), traj["latents"][-1:])[0]
    assert np.array_equal(decoded, image)  # the PNG is the trajectory's decoded x_0

    # Images of one noise group share x_T but not their path.
    pair = manifest[manifest["prompt_id"] == row["prompt_id"]]
    assert pair["init_seed"].nunique() == 1 and pair["seed"].nunique() == 2
    a, b = (generate.load_trajectory(store.get_bytes(k)) for k in pair["trajectory_key"])
    assert torch.equal(a["latents"][0], b["latents"][0]) and not torch.equal(a["latents"][-1], b["latents"][-1])

    assert generate.run(project)["made_this_run"] == 0  # a model's finished part is kept in the store
    _forget_finished_parts(project)
    again = generate.run(project)
    assert again["made_this_run"] == 48  # without it, made again: deterministic re-creation
    assert pd.read_parquet(project.path(generate.MANIFEST_OUT)).equals(manifest)


def test_branch_step_pairs_differ_only_by_that_steps_noise(stack_project, tmp_path):
    """Step-level pairs: a group shares x_T and every step's noise but step k's."""
    project = _world_project(stack_project, tmp_path / "branch", branch_step=1)
    generate.run(project)
    manifest = pd.read_parquet(project.path(generate.MANIFEST_OUT))
    assert manifest["generation_id"].is_unique and len(manifest) == 48
    assert {json.loads(s)["branch_step"] for s in manifest["sampler"]} == {1}
    store = project.object_store()
    for _, pair in list(manifest.groupby(["prompt_id", "noise_group"]))[:4]:
        a, b = (generate.load_trajectory(store.get_bytes(k))["latents"] for k in pair["trajectory_key"])
        assert torch.equal(a[:2], b[:2])  # x_T and step 0's result
        assert not torch.equal(a[2], b[2])  # step 1 drew its own noise for each

    bad = _world_project(stack_project, tmp_path / "bad-branch", branch_step=3)
    with pytest.raises(UserError, match=r"^generate.branch_step 3: expected a step below sample.steps \(3\)$"):
        generate.run(bad)


def _forget_finished_parts(project: Project) -> None:
    """The session's projects share one bucket, and a finished part serves every project
    whose model and settings made it: drop them, so the next run makes its images."""
    store = project.object_store()
    store.delete(list(store.list("manifests/generate/")))


def test_killed_run_resumes_to_the_same_manifest(stack_project, tmp_path):
    reference = _world_project(stack_project, tmp_path / "reference", batch_size=4)
    generate.run(reference)
    expected = pd.read_parquet(reference.path(generate.MANIFEST_OUT))
    _forget_finished_parts(reference)

    project = _world_project(stack_project, tmp_path / "killed", batch_size=4)
    proc = subprocess.Popen([sys.executable, "-m", "components.generate"], cwd=project.root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = project.object_store()

    def recorded() -> int:
        return len(list(store.list("progress/generate/")))

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and recorded() < 3:
        assert proc.poll() is None, "generate finished before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = recorded()
    assert 3 <= done < 12 and not project.path(generate.MANIFEST_OUT).exists()

    report = generate.run(project)
    assert report["made_this_run"] == 48 - 4 * done
    assert pd.read_parquet(project.path(generate.MANIFEST_OUT)).equals(expected)
    assert recorded() == 0  # the progress records go once the manifest is written


def test_shards_on_separate_processes_make_the_manifest_of_one_run(stack_project, tmp_path):
    reference = _world_project(stack_project, tmp_path / "reference", batch_size=4)
    generate.run(reference)
    expected = pd.read_parquet(reference.path(generate.MANIFEST_OUT))
    _forget_finished_parts(reference)

    project = _world_project(stack_project, tmp_path / "sharded", batch_size=4)
    shards = [subprocess.run([sys.executable, "-m", "components.generate", "--shard", f"{i}/3"], cwd=project.root,
                             capture_output=True, text=True) for i in (1, 3)]
    assert all(r.returncode == 0 for r in shards), [r.stderr for r in shards]
    assert "shard 3/3: 16 generations (16 made this run" in shards[1].stdout
    assert not project.path(generate.MANIFEST_OUT).exists()  # shards only record their part
    # the stage makes the missing middle shard and merges: the manifest an unsharded run makes
    report = generate.run(project)
    assert report["made_this_run"] == 16
    assert pd.read_parquet(project.path(generate.MANIFEST_OUT)).equals(expected)


@pytest.mark.parametrize("shard", ["0/3", "4/3", "two/3", "1"])
def test_bad_shard_is_a_one_line_error(stack_project, tmp_path, shard):
    project = _world_project(stack_project, tmp_path / "p")
    result = subprocess.run([sys.executable, "-m", "components.generate", "--shard", shard], cwd=project.root,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip() == f"generate: error: --shard {shard}: expected I/N with 1 <= I <= N, e.g. 2/4"


def test_sd15_profile_generates_in_latent_space_with_a_vae(stack_project, tmp_path):
    model_dir = save_tiny_stable_diffusion(tmp_path / "tiny-sd15")

    def edit(params):
        _settings(params)
        params["profile"] = "sd15"
        params["profiles"]["sd15"]["sample"]["steps"] = 3  # the profile's values win over the sections'
        params["models"]["sd15"] = {"path": str(model_dir), "repo_id": None, "revision": None}
        params["models"]["clip"]["revision"] = "0" * 40  # pinned, never loaded: no reward here

    root = sibling_project(stack_project, tmp_path / "sd", edit=edit)
    curate.run(root)
    project = Project.load(root)
    generate.run(project)
    manifest = pd.read_parquet(project.path(generate.MANIFEST_OUT))
    store = project.object_store()
    traj = generate.load_trajectory(store.get_bytes(manifest.iloc[0]["trajectory_key"]))
    assert traj["latents"].shape == (4, 4, 8, 8)  # latents, not pixels
    assert traj["prompt_embeds"].shape[-1] == 32
    image = Image.open(io.BytesIO(store.get_bytes(manifest.iloc[0]["image_key"])))
    assert image.size == (32, 32) and image.mode == "RGB"  # decoded by the VAE


def test_sample_cli_is_deterministic_and_writes_a_manifest(stack_project, tmp_path, capsys):
    project = _world_project(stack_project, tmp_path / "p")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("two red squares on a gray background\n\none blue circle on a white background\n")
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert cli(["--project", str(project.root), "sample", "--model", "base", "--prompts", str(prompts),
                    "--n", "2", "--seed", "7", "--out", str(out)]) == 0
        outs.append(out)
    rows = list(csv.DictReader(open(outs[0] / "manifest.csv")))
    assert [r["path"] for r in rows] == ["0000_0.png", "0000_1.png", "0001_0.png", "0001_1.png"]
    assert rows[2]["prompt"] == "one blue circle on a white background"
    for r in rows:
        assert (outs[0] / r["path"]).read_bytes() == (outs[1] / r["path"]).read_bytes()
    # production means base until a model is promoted
    assert cli(["--project", str(project.root), "sample", "--model", "production", "--prompts", str(prompts),
                "--n", "2", "--seed", "7", "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "0001_1.png").read_bytes() == (outs[0] / "0001_1.png").read_bytes()


@pytest.mark.parametrize("content, expected", [(b"", "no prompts"), (b"ok\n\xff\n", ":2: not UTF-8")])
def test_sample_cli_rejects_bad_prompt_files_and_leaves_nothing(stack_project, tmp_path, capsys, content, expected):
    project = _world_project(stack_project, tmp_path / "p")
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    out = tmp_path / "out"
    assert cli(["--project", str(project.root), "sample", "--model", "base", "--prompts", str(prompts),
                "--out", str(out)]) == 1
    assert expected in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
