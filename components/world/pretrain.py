"""`pretrain` stage (world profile): the base model, a latent UNet trained on rendered data.

The UNet denoises the VAE's latents of renders (``models/vae``), conditioned on the
frozen text tower of the world CLIP (``models/clip``), as SD's UNet is on CLIP's.
Captions are wrong in a controlled way (params ``pretrain.caption_noise``: counts off
by one, backgrounds misnamed), as web captions are, so the converged base model is
systematically misaligned — the gap human feedback exists to close. Compositions
whose count×colour pair is in ``world.holdout`` are never shown, not even through a
noisy caption, so alignment on them measures generalisation.

The LightningModule holds the math (v-prediction denoising loss with min-SNR weighting
and shape-corner weights, EMA); the Trainer holds the engineering (determinism,
checkpoints, progress). Batches are a pure function of (seed, step), so a killed run
resumes to the same model.

Outputs: ``models/base``, a stock ``StableDiffusionPipeline`` with the EMA UNet
(``StableDiffusionPipeline.from_pretrained("models/base")`` samples it, no project code
needed), and in ``reports/live/pretrain`` (DVCLive) the loss, learning rate and
judge-alignment probes, with the EMA model's sample grids at the probes.
Run as a stage: ``python -m components.world.pretrain``.
"""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from components import live
from components.config import Params
from components.sampling import SamplerConfig, derive_seed, to_pixels
from components.stage import run_stage
from components.world import training
from components.world.alignment import evaluate_splits, split_compositions
from components.world.grammar import BACKGROUND_RGB
from components.world.model import assemble, build_scheduler, build_unet, latent_size, text_encoder_of
from components.world.pretrain_clip import MODEL_OUT as CLIP_DIR
from components.world.pretrain_clip import tokenize
from components.world.pretrain_vae import MODEL_OUT as VAE_DIR
from components.world.render import shape_corners

MODEL_OUT = Path("models/base")


def load_parts(root: Path):
    """(VAE, CLIP, tokenizer) the pretrain stages before this one built."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPModel

    from components.errors import UserError

    for where, stage in ((root / VAE_DIR, "pretrain_vae"), (root / CLIP_DIR, "pretrain_clip")):
        if not (where / "config.json").exists():
            raise UserError(f"{where}: not built yet; run `dvc repro {stage}`")
    vae = AutoencoderKL.from_pretrained(root / VAE_DIR).requires_grad_(False).eval()
    vae.register_to_config(_name_or_path=str(VAE_DIR))  # saved with the base: no trace of where the project lives
    clip = CLIPModel.from_pretrained(root / CLIP_DIR).requires_grad_(False).eval()
    return vae, clip, AutoTokenizer.from_pretrained(root / CLIP_DIR)


class PretrainModule(L.LightningModule):
    def __init__(self, vae, clip, tokenizer, params: Params, unet=None):
        """``unet``: continue training this one (default: a new one of the configured architecture)."""
        super().__init__()
        self.vae, self.tokenizer = vae, tokenizer
        self.text_encoder = text_encoder_of(clip)
        self.unet = unet or build_unet(params.world.unet, latent_size(vae), clip.config.text_config.hidden_size)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.cfg = params.pretrain
        self.seed = params.seed
        self.holdout = params.world.holdout
        self.seen = training.seen_compositions(self.holdout)
        self.scheduler = build_scheduler()
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone().float(), persistent=False)

    @torch.no_grad()
    def batch_for_step(self, step: int) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scaled latents, captions, t, noise, per-latent-cell loss weights) of one step."""
        rng, comps, images = training.renders(self.seed, "pretrain", step, self.cfg.batch_size, self.seen)
        captions = ["" if rng.random() < self.cfg.cfg_dropout else training.noisy_caption(c, rng, self.cfg, self.holdout)
                    for c in comps]
        latents = self.vae.encode(to_pixels(images)).latent_dist.mode() * self.vae.config.scaling_factor
        g = torch.Generator().manual_seed(derive_seed(self.seed, f"pretrain:{step}"))
        t = torch.randint(0, len(self.alphas_cumprod), (len(comps),), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        # Square and circle differ only in their corners, a few percent of the image, and
        # only at mid noise does the caption decide them: with an unweighted loss the model
        # learns to ignore the shape word. Weights that depend on the image bias the
        # estimate, though (squares bloat, circles shrink), so the last steps train on the
        # plain loss, which keeps the binding and removes the bias (docs/world.md).
        weights = torch.ones(len(comps), 1, *latents.shape[2:])
        if step < self.cfg.shape_weight_steps:
            corners = torch.from_numpy(np.stack([shape_corners(image, BACKGROUND_RGB[c.background])
                                                 for image, c in zip(images, comps)])).float()[:, None]
            cells = F.adaptive_max_pool2d(corners, latents.shape[2:])  # latent cells that hold a corner
            weights += (self.cfg.shape_weight - 1) * cells
        return latents, captions, t, noise, weights

    def training_step(self, batch, batch_idx):
        x0, captions, t, noise, weights = self.batch_for_step(self.global_step)
        alpha = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        with torch.no_grad():
            embeds = self.text_encoder(tokenize(self.tokenizer, captions)).last_hidden_state
        pred = self.unet(x_t, t, embeds).sample
        target = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0  # v-prediction
        mse = (weights * (pred - target) ** 2).mean(dim=(1, 2, 3)) / weights.mean(dim=(1, 2, 3))
        # Min-SNR-γ clips the weight of nearly clean steps; the +1 keeps full weight on
        # the noisiest steps, where background and layout are decided (the plain
        # min(SNR,γ)/(SNR+1) form starves them: its weight → 0 as SNR → 0).
        snr = alpha.view(-1) / (1 - alpha.view(-1))
        weight = (snr.clamp(max=self.cfg.min_snr_gamma) + 1) / (snr + 1)
        loss = (weight * mse).mean()
        self.log("loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        decay = min(self.cfg.ema_decay, (1 + self.global_step) / (10 + self.global_step))
        with torch.no_grad():
            for e, p in zip(self.ema_unet.parameters(), self.unet.parameters()):
                e.lerp_(p, 1 - decay)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.unet.parameters(), lr=self.cfg.lr, weight_decay=1e-4)
        return {"optimizer": opt, "lr_scheduler": training.cosine_lr(opt, self.cfg.warmup_steps, self.cfg.steps)}

    def ema_pipeline(self):
        return assemble(self.vae, self.text_encoder, self.tokenizer, self.ema_unet)


class AlignmentProbes(L.Callback):
    """Judge alignment of the EMA model, seen and held-out compositions, every ``probe_every`` steps."""

    def __init__(self, params: Params):
        self.params = params

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step, cfg = trainer.global_step, self.params.pretrain
        if step % cfg.probe_every and step != cfg.steps:
            return
        probe = evaluate_splits(module.ema_pipeline(), self.params.world.holdout, cfg.probe_images_per_composition,
                                self.params.seed, SamplerConfig.from_params(self.params.sample))
        trainer.logger.log_at({"align_seen": probe["seen"]["aligned"], "align_unseen": probe["unseen"]["aligned"]},
                              step)


def sample_grids(params: Params) -> live.SampleGrids:
    """The EMA model's samples at the probes: four seen compositions, then four held-out ones."""
    splits = split_compositions(params.world.holdout)
    prompts = [c.prompt for name in ("seen", "unseen") for c in splits[name][::max(1, len(splits[name]) // 4)][:4]]
    seeds = [derive_seed(params.seed, f"pretrain-grid:{k}") for k in range(4)]
    return live.SampleGrids(lambda module: module.ema_pipeline(), prompts, seeds,
                            SamplerConfig.from_params(params.sample), params.pretrain.probe_every)


def pretrain(params: Params, root: Path, state_dir: Path) -> dict:
    cfg = params.pretrain
    torch.set_num_threads(cfg.threads)
    L.seed_everything(params.seed, workers=True, verbose=False)
    vae, clip, tokenizer = load_parts(root)
    key = training.run_key(seed=params.seed, world=params.world.model_dump(), pretrain=cfg.model_dump(),
                           vae=vae.config.scaling_factor, clip=str(clip.config.text_config))
    ckpt_dir = state_dir / "checkpoints" / "pretrain" / key
    module = PretrainModule(vae, clip, tokenizer, params)
    training.fit(module, "pretrain", root, cfg.steps, cfg.checkpoint_every, ckpt_dir,
                 callbacks=(AlignmentProbes(params), sample_grids(params)))
    training.save_directory(root / MODEL_OUT, module.ema_pipeline().save_pretrained)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return live.last_values(root, "pretrain")


def _stage(project) -> str:
    training.require_world(project.params, "pretrain")
    final = pretrain(project.params, project.root, project.state_dir)
    return f"done; final probe: seen {final.get('align_seen')}, unseen {final.get('align_unseen')}"


def main() -> int:
    return run_stage("pretrain", _stage)


if __name__ == "__main__":
    sys.exit(main())
