"""The GPU profiles on tiny models built from configs: SD1.5 and SDXL through the same code
as the world (sampling, generation, the CLIP reward, every fine-tuning method, LoRA
candidates, evaluation), checked against stock diffusers pipelines."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from components import evaluate, feedback, models
from components.errors import UserError
from components.finetune import stage as finetune_stage
from components.reward import train as reward_train
from components.sampling import SamplerConfig, derive_seed, encode_prompts, sample
from tests.conftest import sibling_project
from tests.models import save_tiny_clip, save_tiny_sdxl, save_tiny_stable_diffusion
from tests.test_training_stages import METHODS, _tiny, generate_and_label

BUILDERS = {"sd15": save_tiny_stable_diffusion, "sdxl": save_tiny_sdxl}
PROMPTS = ["two red circles on a white background", "one blue square on a black background"]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny_model(request, tmp_path_factory):
    return request.param, BUILDERS[request.param](tmp_path_factory.mktemp(request.param) / "model")


def test_deterministic_sampling_matches_the_stock_pipeline(tiny_model):
    """eta = 0 leaves only x_T random: from the same x_T, our sampler (with everything it
    records) and the stock pipeline's __call__ must draw the same images."""
    profile, model_dir = tiny_model
    pipe = models.load_pipeline(model_dir)
    config = SamplerConfig(steps=4, guidance_scale=5.0, eta=0.0)
    ours = sample(pipe, PROMPTS, [3, 4], config)
    x_t = torch.stack([torch.randn(ours.latents.shape[2:], generator=torch.Generator().manual_seed(
        derive_seed(s, "x_T"))) for s in (3, 4)])
    stock = pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, eta=0.0, latents=x_t, output_type="np").images
    assert np.abs(ours.images.astype(int) - np.round(stock * 255).astype(int)).max() <= 1
    if profile == "sdxl":  # pooled embeddings and size ids recorded for the log-prob
        assert ours.cond.pooled.shape == (2, pipe.text_encoder_2.config.projection_dim)
        assert ours.cond.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2


def test_recorded_log_probs_are_what_training_recomputes(tiny_model):
    from components.sampling import step_log_prob

    _, model_dir = tiny_model
    pipe = models.load_pipeline(model_dir)
    config = SamplerConfig(steps=3, guidance_scale=5.0, eta=1.0)
    traj = sample(pipe, PROMPTS, [0, 1], config)
    for step, (t, prev_t) in enumerate(zip(traj.timesteps.tolist(), (traj.timesteps - 1000 // 3).tolist())):
        with torch.no_grad():
            recomputed = step_log_prob(pipe.unet, pipe.scheduler, traj.latents[:, step], t, prev_t,
                                       traj.latents[:, step + 1], traj.cond, traj.uncond, config)
        torch.testing.assert_close(recomputed, traj.log_probs[:, step], rtol=1e-4, atol=1e-4)
    cond, _ = encode_prompts(pipe, PROMPTS[:1])
    torch.testing.assert_close(traj.cond[0:1].embeds, cond.embeds)


def test_a_missing_component_is_one_line_naming_it(tiny_model, tmp_path):
    _, model_dir = tiny_model
    broken = shutil.copytree(model_dir, tmp_path / "model")
    shutil.rmtree(broken / "unet")
    with pytest.raises(UserError) as err:
        models.load_pipeline(broken)
    assert str(err.value) == f"{broken}: the pipeline's unet (UNet2DConditionModel) is missing: expected the folder " \
                             f"{broken / 'unet'}"


def test_a_damaged_weights_file_is_one_line(tiny_model, tmp_path):
    _, model_dir = tiny_model
    broken = shutil.copytree(model_dir, tmp_path / "model")
    (broken / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(UserError, match=rf"^{broken}: cannot load the pipeline \(.+\); rebuild it") as err:
        models.load_pipeline(broken)
    assert "\n" not in str(err.value)


def test_components_from_different_models_are_refused_in_one_line(tmp_path):
    """An SDXL whose second text encoder comes from another model: it loads, but would fail
    with a shape error inside the first UNet call."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from tests.models import TINY_CLIP_TEXT

    model_dir = save_tiny_sdxl(tmp_path / "sdxl")
    shutil.rmtree(model_dir / "text_encoder_2")
    other = CLIPTextModelWithProjection(CLIPTextConfig(**{**TINY_CLIP_TEXT, "hidden_size": 48, "projection_dim": 24}))
    other.save_pretrained(model_dir / "text_encoder_2")
    with pytest.raises(UserError, match=r"unet attends to 64-wide text states, but text_encoder \(32\) \+ "
                                        r"text_encoder_2 \(48\) give 80: the components come from different models"):
        models.load_pipeline(model_dir)


# ---- SDXL through every stage, as the sdxl profile runs it -----------------------------

@pytest.fixture(scope="module")
def sdxl_project(stack_project, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl-stages")
    model_dir, clip_dir = save_tiny_sdxl(tmp / "tiny-sdxl"), save_tiny_clip(tmp / "tiny-clip")

    def edit(params):
        _tiny(params)
        params["generate"].update(splits=["train", "eval"], images_per_prompt=2)  # a pair per prompt
        params["evaluate"].update(max_prompts=3, images_per_prompt=2, grid_prompts=2)
        params["profile"] = "sdxl"
        params["models"].update(sdxl={"path": str(model_dir)}, clip={"path": str(clip_dir)})
        sdxl = params["profiles"]["sdxl"]
        sdxl["sample"].update(steps=3, dtype="float32")
        sdxl["generate"]["batch_size"] = 16
        sdxl["evaluate"].update(max_prompts=3, images_per_prompt=2)
        # the profile's GPU settings, on the CPU: LoRA, gradient checkpointing, accumulation
        sdxl["finetune"].update(accelerator="cpu", precision="32-true", accumulate_grad_batches=2,
                                lora={"rank": 4, "alpha": 4.0})
        for method, tiny in params["finetune"].items():
            if method in METHODS:
                sdxl["finetune"][method] = {**sdxl["finetune"].get(method, {}), **tiny}
        sdxl["finetune"]["d3po"]["pairs_per_batch"] = 16

    project = generate_and_label(sibling_project(stack_project, tmp / "project", edit=edit))
    reward_train.train_reward(project.params, project.root, project.object_store())
    return project, model_dir


def test_sdxl_generations_record_the_conditioning_they_were_sampled_with(sdxl_project):
    from components.generate import load_trajectory

    project, _ = sdxl_project
    gens = feedback.generations(project.root)
    data = load_trajectory(project.object_store().get_bytes(gens.iloc[0]["trajectory_key"]))
    assert len(gens) == 96 * 2 and data["latents"].shape == (4, 4, 8, 8)  # x_T … x_0 of 3 steps, latent space
    assert data["prompt_pooled"].shape == data["negative_pooled"].shape == (32,)
    assert data["prompt_time_ids"].tolist() == [32, 32, 0, 0, 32, 32]
    assert json.loads((project.root / "models/reward/config.json").read_text())["_class_name"] == "ClipRewardHead"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_fine_tunes_sdxl_into_a_lora_stock_diffusers_loads(sdxl_project, method):
    from diffusers import StableDiffusionXLPipeline

    project, model_dir = sdxl_project
    params = project.params.model_copy(update={"finetune": project.params.finetune.model_copy(
        update={"method": method})})
    report = finetune_stage.finetune(dataclasses.replace(project, params=params))
    assert report["method"] == method and report["final"]["step"] == report["steps"] > 0
    out = project.path(finetune_stage.CANDIDATE_OUT)

    stock = StableDiffusionXLPipeline.from_pretrained(model_dir, local_files_only=True)
    config = SamplerConfig(steps=3, guidance_scale=5.0, eta=1.0)
    before = sample(stock, PROMPTS, [5, 6], config).images
    stock.load_lora_weights(out)
    after = sample(stock, PROMPTS, [5, 6], config).images
    assert not np.array_equal(before, after)  # the adapter, in diffusers format, changes the model
    ours = sample(models.load_pipeline(out), PROMPTS, [5, 6], config).images  # fused by aligndiff's loader
    assert np.abs(ours.astype(int) - after.astype(int)).max() <= 1

    if method == METHODS[-1]:
        metrics = evaluate.evaluate(project)
        assert metrics["prompts"] == 3 and metrics["images_per_model"] == 6
        assert 0 <= metrics["reward"]["win_rate"] <= 1 and metrics["drift"] > 0
