"""Correctness of the fine-tuning objectives on a tiny world model (CPU, no services)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from components.config import FinetuneParams, LoraParams
from components.finetune import methods
from components.finetune.core import encode_images, encode_text, save_candidate
from components.models import load_pipeline
from components.sampling import SamplerConfig, sample
from tests.models import save_tiny_world_model

SAMPLER = SamplerConfig(steps=4, guidance_scale=3.0, eta=1.0)
PROMPT = "two red circles on a white background"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_world_model(tmp_path_factory.mktemp("base") / "base")


def fresh(base_dir):
    torch.manual_seed(0)
    return load_pipeline(base_dir)


def pairs_from(pipe, n: int = 4) -> methods.TrajectoryPairs:
    """n pairs, each two images from one shared x_T with different step noise."""
    traj = sample(pipe, [PROMPT] * 2 * n, list(range(2 * n)), SAMPLER, init_seeds=[i // 2 for i in range(2 * n)])
    return methods.TrajectoryPairs.of(traj, winner=range(0, 2 * n, 2), loser=range(1, 2 * n, 2))


def d3po(pipe, pairs, **overrides) -> methods.D3PO:
    cfg = FinetuneParams(method="d3po", d3po={"timestep_fraction": 1.0, **overrides})
    module = methods.D3PO(pipe, cfg, seed=0, pairs=pairs, sampler=SAMPLER)
    module.schedule = [np.arange(len(pairs.winner))]
    return module


def preference_margin(module: methods.D3PO) -> float:
    """Σ over steps of log-ratio(winner) − log-ratio(loser), unclamped."""
    from components.sampling import step_log_prob

    p, total = module.pairs, 0.0
    with torch.no_grad():
        for step in range(len(p.timesteps)):
            t, prev_t = int(p.timesteps[step]), int(module.prevs[step])
            args = (module.pipe.scheduler, p.latents[:, step], t, prev_t, p.latents[:, step + 1], p.cond, p.uncond,
                    SAMPLER)
            policy = step_log_prob(module.unet, *args)
            with module.reference_unet() as ref:
                ratio = policy - step_log_prob(ref, *args)
            total += float((ratio[p.winner] - ratio[p.loser]).sum())
    return total


def test_d3po_loss_is_log_2_at_initialisation(base_dir):
    pipe = fresh(base_dir)
    module = d3po(pipe, pairs_from(pipe))
    assert float(module.training_step(None, 0)) == pytest.approx(math.log(2), abs=1e-6)


def test_one_d3po_step_raises_the_winner_relative_to_the_loser_and_touches_only_lora(base_dir):
    pipe = fresh(base_dir)
    module = d3po(pipe, pairs_from(pipe), lr=1e-4, beta=1.0)
    frozen = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if not p.requires_grad}
    text = [p.detach().clone() for p in pipe.text_encoder.parameters()]
    lora = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert lora and all("lora" in n for n in lora)

    before = preference_margin(module)
    optimizer = module.configure_optimizers()
    module.training_step(None, 0).backward()
    optimizer.step()
    assert preference_margin(module) > before

    assert all(torch.equal(p, frozen[n]) for n, p in pipe.unet.named_parameters() if n in frozen)
    assert all(torch.equal(a, b) for a, b in zip(pipe.text_encoder.parameters(), text))
    assert any(not torch.equal(p, lora[n]) for n, p in pipe.unet.named_parameters() if n in lora)


def test_d3po_scores_an_image_in_several_pairs_once_with_the_same_gradient(base_dir):
    """All three pairs of a group of three images sharing x_T: each trajectory stored and
    run once gives the gradient of the same pairs with every trajectory duplicated."""
    grads = []
    for shared in (True, False):
        pipe = fresh(base_dir)
        traj = sample(pipe, [PROMPT] * 3, [0, 1, 2], SAMPLER, init_seeds=[0, 0, 0])
        winner, loser = [0, 0, 1], [1, 2, 2]
        if shared:
            pairs = methods.TrajectoryPairs.of(traj, winner, loser)
        else:
            rows = torch.as_tensor(winner + loser)
            copies = methods.TrajectoryPairs.of(traj, [], [])
            pairs = methods.TrajectoryPairs(latents=copies.latents[rows], cond=copies.cond[rows],
                                            uncond=copies.uncond[rows], timesteps=copies.timesteps,
                                            winner=torch.arange(3), loser=torch.arange(3, 6))
        module = d3po(pipe, pairs, beta=1.0)
        with torch.no_grad():  # off the reference, so every pair's sigmoid weight differs
            for p in module.trainable():
                p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        calls = []
        pipe.unet.register_forward_hook(lambda _m, args, _out: calls.append(len(args[0])))
        module.training_step(None, 0).backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.trainable()]))
        # per step: the policy and the reference, each on the batch's trajectories (cond + uncond)
        assert set(calls) == {2 * len(pairs.latents)}
    scale = float(grads[0].abs().max())
    assert scale > 0  # float32 kernels round differently on batches of 3 and 6: equal to 1e-3 of the scale
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-3 * scale)


def test_no_gradient_once_the_ratio_leaves_the_clip_band(base_dir):
    pipe = fresh(base_dir)
    module = d3po(pipe, pairs_from(pipe), clip=1e-4)
    with torch.no_grad():  # move the policy far from the reference: every ratio is clamped
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    assert abs(preference_margin(module)) > 0
    assert all(bool(module.pair_logits(torch.arange(4), step)[1].all()) for step in range(SAMPLER.steps))
    module.training_step(None, 0).backward()
    grads = [p.grad for p in module.trainable() if p.grad is not None]
    assert all(float(g.abs().max()) == 0 for g in grads)

    inside = d3po(fresh(base_dir), module.pairs, clip=0.1)
    assert not any(bool(inside.pair_logits(torch.arange(4), step)[1].any()) for step in range(SAMPLER.steps))
    inside.training_step(None, 0).backward()
    assert any(float(p.grad.abs().max()) > 0 for p in inside.trainable() if p.grad is not None)


def brightness(images, prompts):
    """A reward that needs no model: the mean pixel value."""
    return images.reshape(len(images), -1).mean(axis=1) / 255.0


def test_prdp_loss_at_initialisation_is_the_squared_scaled_reward_difference(base_dir):
    pipe = fresh(base_dir)
    cfg = FinetuneParams(method="prdp", prdp={"prompts_per_epoch": 2, "images_per_prompt": 3, "beta": 0.5})
    module = methods.PRDP(pipe, cfg, seed=0, prompts=[PROMPT, "one blue square on a black background"],
                          reward_fn=brightness, sampler=SAMPLER)
    module.resample(0)
    s = module.epoch_samples
    rewards = s["rewards"]
    # pairs only within a prompt, each unordered pair once, ordered so that Δr > 0
    assert len(s["a"]) == 2 * 3 and bool((rewards[s["a"]] > rewards[s["b"]]).all())
    assert bool((s["a"] // 3 == s["b"] // 3).all())
    expected = (((rewards[s["a"]] - rewards[s["b"]]) / 0.5) ** 2).mean()
    loss, stats = module.prdp_loss(s, list(range(SAMPLER.steps)))
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    assert float(stats["clip_fraction"]) == 0


def test_prdp_gradient_is_the_same_with_per_step_checkpointing(base_dir, monkeypatch):
    """Checkpointing the steps saves memory (bench/prdp_memory.py) and must not change the update."""
    cfg = FinetuneParams(method="prdp", prdp={"prompts_per_epoch": 2, "images_per_prompt": 3, "clip": 0.05})
    grads = []
    for checkpointed in (True, False):
        if not checkpointed:
            monkeypatch.setattr(methods, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
        module = methods.PRDP(fresh(base_dir), cfg, seed=0, prompts=[PROMPT, "one blue square on a black background"],
                              reward_fn=brightness, sampler=SAMPLER)
        with torch.no_grad():  # move the policy off the reference, so the ratios (and the clip) matter
            for p in module.trainable():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        module.resample(0)
        loss, _ = module.prdp_loss(module.epoch_samples, list(range(SAMPLER.steps)))
        loss.backward()
        grads.append([p.grad.clone() for p in module.trainable()])
    assert any(float(g.abs().max()) > 0 for g in grads[0])
    for with_checkpoints, without in zip(*grads):
        torch.testing.assert_close(with_checkpoints, without, rtol=1e-4, atol=1e-7)


def test_diffusion_dpo_loss_is_log_2_at_initialisation_and_learns_the_preference(base_dir):
    pipe = fresh(base_dir)
    images = sample(pipe, [PROMPT] * 4, [0, 1, 2, 3], SAMPLER, record=False).images
    winner, loser = encode_images(pipe, images[:2]), encode_images(pipe, images[2:])
    cfg = FinetuneParams(method="diffusion_dpo", diffusion_dpo={"lr": 1e-3})
    module = methods.DiffusionDPO(pipe, cfg, seed=0, winner=winner, loser=loser, cond=encode_text(pipe, [PROMPT] * 2))
    module.schedule = [np.arange(2)]
    assert float(module.training_step(None, 0)) == pytest.approx(math.log(2), abs=1e-6)
    optimizer = module.configure_optimizers()
    for _ in range(5):
        optimizer.zero_grad()
        module.training_step(None, 0).backward()
        optimizer.step()
    assert float(module.training_step(None, 0)) < math.log(2)


def test_saved_lora_reproduces_the_fine_tuned_samples(base_dir, tmp_path):
    pipe = fresh(base_dir)
    module = d3po(pipe, pairs_from(pipe), lr=1e-2, beta=1.0)
    optimizer = module.configure_optimizers()
    for _ in range(3):
        optimizer.zero_grad()
        module.training_step(None, 0).backward()
        optimizer.step()
    def draw(model):
        return sample(model, [PROMPT] * 4, [7, 8, 9, 10], SamplerConfig(steps=4), record=False).images

    tuned = draw(pipe)
    assert not np.array_equal(tuned, draw(fresh(base_dir)))

    out = tmp_path / "candidate"
    save_candidate(pipe, out, LoraParams(), str(base_dir), {"method": "d3po"})
    plain = fresh(base_dir)
    plain.load_lora_weights(out)  # the diffusers way
    assert np.array_equal(draw(plain), tuned)
    fused = load_pipeline(out)  # aligndiff's loader: base from candidate.json, adapter fused
    assert np.abs(draw(fused).astype(int) - tuned).max() <= 1


def test_gradient_checkpointing_changes_memory_not_the_gradients(base_dir):
    grads = []
    for checkpointing in (False, True):
        pipe = fresh(base_dir)
        cfg = FinetuneParams(method="diffusion_dpo", gradient_checkpointing=checkpointing)
        traj = sample(pipe, [PROMPT] * 4, [0, 1, 2, 3], SAMPLER)
        module = methods.DiffusionDPO(pipe, cfg, seed=0, winner=traj.latents[0::2, -1], loser=traj.latents[1::2, -1],
                                      cond=traj.cond[0::2])
        module.schedule = [np.arange(2)]
        assert pipe.unet.is_gradient_checkpointing == checkpointing
        module.training_step(None, 0).backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.trainable()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_sd15_profile_settings_train_a_latent_model_with_lightning(tmp_path):
    """The GPU profile's code path on CPU: LoRA rank 16 + gradient checkpointing, D3PO and PRDP
    through the stage's Trainer, and the LoRA loads into a stock diffusers pipeline."""
    import yaml
    from diffusers import StableDiffusionPipeline

    from components.config import parse_params
    from components.finetune.stage import trainer_for
    from tests.models import save_tiny_stable_diffusion

    model_dir = save_tiny_stable_diffusion(tmp_path / "sd15")
    data = yaml.safe_load(open("params.yaml"))
    data.update(profile="sd15", models={**data["models"], "sd15": {"path": str(model_dir)},
                                        "clip": {"repo_id": "openai/clip-vit-large-patch14", "revision": "0" * 40}})
    data["profiles"]["sd15"]["finetune"].update(accelerator="cpu", precision="32-true")
    data["profiles"]["sd15"]["finetune"]["prdp"].update(prompts_per_epoch=2, images_per_prompt=2, updates_per_epoch=1)
    params = parse_params(data)
    sampler = SamplerConfig(steps=3, guidance_scale=params.sample.guidance_scale, eta=1.0)
    pipe = load_pipeline(model_dir)
    traj = sample(pipe, ["red circles", "blue squares"] * 2, [0, 1, 2, 3], sampler, init_seeds=[0, 0, 1, 1])
    pairs = methods.TrajectoryPairs.of(traj, winner=[0, 2], loser=[1, 3])

    def brightness(images, _prompts):
        return images.reshape(len(images), -1).mean(axis=1) / 255.0

    for module in (methods.D3PO(load_pipeline(model_dir), params.finetune, 0, pairs, sampler),
                   methods.PRDP(load_pipeline(model_dir), params.finetune, 0, ["red circles", "blue squares"],
                                brightness, sampler)):
        module.schedule = [np.arange(2)]
        assert module.unet.is_gradient_checkpointing
        lora = {n: p.detach().clone() for n, p in module.unet.named_parameters() if p.requires_grad}
        trainer, loader = trainer_for(params.finetune, 1, [])
        trainer.fit(module, loader)
        assert math.isfinite(float(trainer.callback_metrics["loss"]))
        assert any(not torch.equal(p, lora[n]) for n, p in module.unet.named_parameters() if n in lora)

    out = tmp_path / "candidate"
    save_candidate(module.pipe, out, params.finetune.lora, str(model_dir), {"method": "prdp"})
    stock = StableDiffusionPipeline.from_pretrained(model_dir)
    x, cond = traj.latents[:1, 0], traj.cond[:1]
    with torch.no_grad():
        before = stock.unet(x, 500, **cond.unet_kwargs()).sample
        stock.load_lora_weights(out)
        after = stock.unet(x, 500, **cond.unet_kwargs()).sample
    assert not torch.equal(before, after)  # the trained adapter, in diffusers format, changes the UNet
