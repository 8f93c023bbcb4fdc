"""The synthetic world: grammar, renderer and judge."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from components.world.grammar import BACKGROUND_RGB, Composition, all_compositions, parse_prompt, vocabulary
from components.world.judge import judge
from components.world.render import IMAGE_SIZE, render, render_batch, shape_corners

COMPOSITIONS = all_compositions()


def test_grammar_has_96_compositions_with_unique_round_tripping_prompts():
    assert len(COMPOSITIONS) == 96
    prompts = [c.prompt for c in COMPOSITIONS]
    assert len(set(prompts)) == 96
    assert all(parse_prompt(p) == c for p, c in zip(prompts, COMPOSITIONS))
    assert Composition(3, "green", "circle", "black").prompt == "three green circles on a black background"
    assert Composition(1, "red", "square", "gray").prompt == "one red square on a gray background"
    assert parse_prompt("  Three GREEN circles on a black   background ") == Composition(3, "green", "circle", "black")
    assert parse_prompt("five green circles on a black background") is None
    assert all(w in vocabulary() for p in prompts for w in p.split())


def test_perturbations_change_exactly_one_attribute():
    c = Composition(2, "blue", "square", "white")
    perturbed = c.perturbations()
    assert len(perturbed) == 3 + 3 + 1 + 2
    for p in perturbed:
        diffs = [a for a in ("count", "colour", "shape", "background") if p.value(a) != c.value(a)]
        assert len(diffs) == 1


def test_renderer_is_deterministic_and_uses_the_palette():
    a = render_batch(COMPOSITIONS, seed=7)
    b = render_batch(COMPOSITIONS, seed=7)
    assert a.shape == (96, IMAGE_SIZE, IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render_batch(COMPOSITIONS, seed=8))
    image = render(Composition(2, "red", "square", "black"), np.random.default_rng(0))
    colours = {tuple(px) for px in image.reshape(-1, 3)}
    assert colours == {(0, 0, 0), (230, 25, 25)}


def test_shape_corners_are_exactly_where_a_square_and_a_circle_layout_differ():
    for seed, c in enumerate(COMPOSITIONS):
        squares = render(c.with_value("shape", "square"), np.random.default_rng(seed))
        circles = render(c.with_value("shape", "circle"), np.random.default_rng(seed))  # same placements
        differ = np.any(squares != circles, axis=-1)
        background = BACKGROUND_RGB[c.background]
        assert differ.any(), c.prompt
        assert np.array_equal(shape_corners(squares, background), differ), c.prompt
        assert np.array_equal(shape_corners(circles, background), differ), c.prompt


def test_judge_agrees_with_rendered_images_at_least_99_percent():
    rng = np.random.default_rng(123)
    verdicts = [judge(render(c, rng), c) for c in COMPOSITIONS * 10]
    assert sum(v.aligned for v in verdicts) / len(verdicts) >= 0.99


def test_judge_rejects_near_misses_naming_the_wrong_attribute():
    rng = np.random.default_rng(5)
    for c in COMPOSITIONS:
        image = render(c, rng)
        for wrong in c.perturbations():
            verdict = judge(image, wrong)
            assert not verdict.aligned, (c.prompt, wrong.prompt)
            attribute = next(a for a in ("count", "colour", "shape", "background") if c.value(a) != wrong.value(a))
            assert not getattr(verdict, attribute)
            assert verdict.score == 3


def test_judge_reason_says_what_was_expected_and_found():
    image = render(Composition(2, "green", "circle", "black"), np.random.default_rng(0))
    verdict = judge(image, "three green circles on a black background")
    assert verdict.reason == "expected three, found two blobs"
    verdict = judge(image, "two red circles on a white background")
    assert "expected red, saw green" in verdict.reason and "expected a white background, saw black" in verdict.reason


@pytest.mark.parametrize("noise, blur", [(10, 0.6), (20, 0.0)])
def test_judge_is_robust_to_generation_noise(noise, blur):
    rng = np.random.default_rng(9)
    agree = 0
    for c in COMPOSITIONS * 3:
        image = render(c, rng).astype(float)
        image = ndimage.gaussian_filter(image, sigma=(blur, blur, 0)) if blur else image
        image = np.clip(image + rng.normal(0, noise, image.shape), 0, 255).astype(np.uint8)
        agree += judge(image, c).aligned
    assert agree / (3 * len(COMPOSITIONS)) >= 0.95


def test_judge_tells_ragged_squares_from_circles_by_their_corners():
    """Generated squares come out pinched: notched edges, a corner pixel lost. They fill
    about 0.85 of their box, as much as a small disc, but their corners stay filled."""
    rng = np.random.default_rng(2)
    for c in [c for c in COMPOSITIONS if c.shape == "square"]:
        image = render(c, rng)
        labels, _ = ndimage.label(np.any(image != BACKGROUND_RGB[c.background], axis=-1))
        for box in ndimage.find_objects(labels):
            (y0, y1), (x0, x1) = (box[0].start, box[0].stop), (box[1].start, box[1].stop)
            ym, xm = (y0 + y1) // 2, (x0 + x1) // 2
            for y, x in [(y0, xm - 1), (y0, xm), (y0, xm + 1), (y1 - 1, xm - 1), (y1 - 1, xm), (y1 - 1, xm + 1),
                         (ym - 1, x0), (ym, x0), (ym + 1, x0), (ym - 1, x1 - 1), (ym, x1 - 1), (ym + 1, x1 - 1),
                         (y0, x0), (y1 - 1, x1 - 1)]:
                image[y, x] = BACKGROUND_RGB[c.background]
        verdict = judge(image, c)
        assert verdict.shape and verdict.count, (c.prompt, verdict.reason)
        assert not judge(image, c.with_value("shape", "circle")).shape


def test_judge_refuses_prompts_outside_the_grammar():
    with pytest.raises(ValueError, match="not in the world grammar"):
        judge(np.zeros((32, 32, 3), np.uint8), "a photo of a cat")


def test_pretraining_weights_shape_corners_then_finishes_on_the_plain_loss(tmp_path):
    """Image-dependent weights bias the denoiser (squares bloat, circles shrink): only the
    first ``shape_weight_steps`` use them; the steps after train on the plain loss."""
    from transformers import CLIPModel

    from components.config import parse_params
    from components.models import load_pipeline
    from components.world.pretrain import PretrainModule
    from tests.models import TINY_WORLD, save_tiny_world_model

    params = parse_params({"world": TINY_WORLD, "pretrain": {"batch_size": 4, "shape_weight": 8.0,
                                                             "shape_weight_steps": 3}})
    clip_dir = tmp_path / "clip"
    pipe = load_pipeline(save_tiny_world_model(tmp_path / "base", clip_dir=clip_dir))
    module = PretrainModule(pipe.vae, CLIPModel.from_pretrained(clip_dir), pipe.tokenizer, params)
    weighted, plain = module.batch_for_step(2)[-1], module.batch_for_step(3)[-1]
    assert set(weighted.unique().tolist()) == {1.0, 8.0}
    assert torch.equal(plain, torch.ones_like(plain))


def test_stock_diffusers_samples_the_world_base_and_applies_a_candidate(tmp_path):
    """What a user runs with no project code: the world base is a ``StableDiffusionPipeline``
    and a LoRA candidate loads with ``load_lora_weights``; both draw what aligndiff draws."""
    from diffusers import StableDiffusionPipeline

    from components.config import LoraParams
    from components.finetune.core import attach_policy, save_candidate
    from components.models import load_pipeline
    from components.sampling import SamplerConfig, derive_seed, sample
    from tests.models import save_tiny_world_model

    base = save_tiny_world_model(tmp_path / "base")
    prompts, seeds = ["two red circles on a white background", "one blue square on a black background"], [3, 4]
    config = SamplerConfig(steps=4, guidance_scale=2.0, eta=0.0)  # eta 0: only x_T is random

    def stock_draw(pipe) -> np.ndarray:
        x_t = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(derive_seed(s, "x_T")))
                           for s in seeds])
        out = pipe(prompts, num_inference_steps=4, guidance_scale=2.0, eta=0.0, latents=x_t, output_type="np")
        return np.round(out.images * 255).astype(int)

    stock = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    plain = stock_draw(stock)
    assert plain.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.abs(plain - sample(load_pipeline(base), prompts, seeds, config).images).max() <= 1

    tuned = load_pipeline(base)
    attach_policy(tuned, LoraParams())
    with torch.no_grad():  # a LoRA starts as a no-op (B = 0): give it an effect
        for name, param in tuned.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    save_candidate(tuned, tmp_path / "candidate", LoraParams(), str(base), {"method": "test"})
    stock.load_lora_weights(tmp_path / "candidate")
    with_lora = stock_draw(stock)
    assert not np.array_equal(with_lora, plain)
    assert np.abs(with_lora - sample(tuned, prompts, seeds, config).images).max() <= 1


def test_vae_pretraining_learns_the_round_trip_and_sets_its_scaling_factor(tmp_path):
    """A tiny VAE on fresh renders: it reconstructs far better than at initialisation, its
    scaling_factor makes the latents unit-variance, and it reloads as a stock AutoencoderKL."""
    from diffusers import AutoencoderKL

    from components.config import parse_params
    from components.world.pretrain_vae import MODEL_OUT, REPORT_OUT, pretrain_vae, round_trip
    from tests.models import TINY_WORLD

    params = parse_params({"world": TINY_WORLD, "pretrain_vae": {"steps": 300, "batch_size": 16, "lr": 2e-3,
                                                                  "judge_images": 32}})
    report = pretrain_vae(params, tmp_path, tmp_path / "state")
    assert json.loads((tmp_path / REPORT_OUT).read_text()) == report
    assert 0 <= report["judge_agreement"]["near_misses_included"] <= report["judge_agreement"]["true_prompt"] <= 1
    vae = AutoencoderKL.from_pretrained(tmp_path / MODEL_OUT)
    images = render_batch(all_compositions()[:48], seed=1)
    decoded, latents = round_trip(vae, images)
    assert latents.shape == (48, 4, 8, 8)
    assert float((latents * vae.config.scaling_factor).std()) == pytest.approx(1.0, abs=0.15)
    error = np.abs(decoded.astype(float) - images).mean()
    untrained = np.abs(round_trip(AutoencoderKL.from_config(vae.config), images)[0].astype(float) - images).mean()
    assert error < untrained / 2, (error, untrained)
    assert report["pixel_error"] < untrained / 2  # the report measures the same, on other renders
    assert not list((tmp_path / "state").rglob("*.ckpt"))  # checkpoints go once the model is saved


def test_clip_pretraining_matches_renders_to_captions_and_reloads_for_the_reward(tmp_path):
    """A tiny CLIP, trained contrastively on captioned renders: zero-shot, it tells the
    background (the attribute tiny models learn first) far above chance, on seen and on
    held-out compositions; the saved folder is what the reward and the pipeline load."""
    from components.config import parse_params
    from components.reward.model import load_clip
    from components.world.model import text_encoder_of
    from components.world.pretrain_clip import MODEL_OUT, pretrain_clip
    from tests.models import TINY_WORLD

    params = parse_params({"world": TINY_WORLD, "pretrain_clip": {"steps": 60, "batch_size": 32, "lr": 3e-3}})
    found = pretrain_clip(params, tmp_path, tmp_path / "state")["retrieval"]
    assert found["seen"]["images"] == 72 * 8 and found["unseen"]["images"] == 24 * 8
    assert found["seen"]["background"] > 0.8 and found["unseen"]["background"] > 0.8  # chance: 1/3
    assert found["seen"]["clip_score"] > 0.2

    clip, tokenizer, processor = load_clip(tmp_path / MODEL_OUT)
    assert processor.crop_size == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ids = tokenizer(["two red circles on a white background"], return_tensors="pt").input_ids
    assert tokenizer.convert_ids_to_tokens(ids[0])[1:3] == ["two", "red"]  # the world's own words, no sub-words
    encoder = text_encoder_of(clip)
    torch.testing.assert_close(encoder(ids).last_hidden_state, clip.text_model(ids).last_hidden_state)
    assert not list((tmp_path / "state").rglob("*.ckpt"))  # checkpoints go once the model is saved
