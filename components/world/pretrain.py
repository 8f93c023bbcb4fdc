"""`pretrain` stage (world profile): the base text-to-image model, trained on rendered data.

Captions are wrong in a controlled way (params ``pretrain.caption_noise``: counts off
by one, backgrounds misnamed), as web captions are, so the converged base model is
systematically misaligned — the gap human feedback exists to close. Compositions
whose count×colour pair is in ``world.holdout`` are never shown, not even through a
noisy caption, so alignment on them measures generalisation.

Every batch is a pure function of (seed, step): rendering, caption noise, timesteps
and noise all come from generators seeded by the step, so a run killed and resumed
from its last checkpoint produces the same model as an uninterrupted one. The LightningModule
holds the math (v-prediction denoising loss with min-SNR weighting and shape-corner
pixel weights, EMA); the Trainer holds the
engineering (determinism, checkpoints, progress bar).

Outputs: ``models/base`` (diffusers ``WorldPipeline`` with the EMA weights) and
``reports/pretrain_curve.csv`` (loss and judge-alignment probes, for ``dvc plots``).
Run as a stage: ``python -m components.world.pretrain``.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch

from components.config import Params, PretrainParams
from components.models import quiet_model_io
from components.progress import on_terminal, progress_callbacks
from components.sampling import SamplerConfig, derive_seed
from components.stage import run_stage
from components.world.alignment import evaluate_splits
from components.world.grammar import BACKGROUND_RGB, BACKGROUNDS, Composition, all_compositions
from components.world.model import WorldPipeline
from components.world.render import render, shape_corners

MODEL_OUT = Path("models/base")
CURVE_OUT = Path("reports/pretrain_curve.csv")
CURVE_FIELDS = ["step", "loss", "lr", "align_seen", "align_unseen"]


def is_held_out(c: Composition, holdout: list[str]) -> bool:
    return f"{c.count_word} {c.colour}" in holdout


def noisy_caption(c: Composition, rng: np.random.Generator, noise: PretrainParams, holdout: list[str]) -> str:
    """The caption a web scraper would have attached: sometimes the count or background is wrong."""
    caption = c
    if rng.random() < noise.caption_noise.count_off_by_one:
        options = [n for n in (c.count - 1, c.count + 1) if 1 <= n <= 4]
        options = [n for n in options if not is_held_out(Composition(n, c.colour, c.shape, c.background), holdout)]
        if options:
            caption = Composition(int(rng.choice(options)), c.colour, c.shape, c.background)
    if rng.random() < noise.caption_noise.wrong_background:
        others = [b for b in BACKGROUNDS if b != c.background]
        caption = Composition(caption.count, caption.colour, caption.shape, str(rng.choice(others)))
    return caption.prompt


class PretrainModule(L.LightningModule):
    def __init__(self, pipe: WorldPipeline, params: Params):
        super().__init__()
        self.pipe = pipe
        self.unet, self.text_encoder = pipe.unet, pipe.text_encoder
        self.ema_unet = copy.deepcopy(pipe.unet).requires_grad_(False)
        self.ema_text_encoder = copy.deepcopy(pipe.text_encoder).requires_grad_(False)
        self.cfg = params.pretrain
        self.seed = params.seed
        self.holdout = params.world.holdout
        self.seen = [c for c in all_compositions() if not is_held_out(c, self.holdout)]
        self.register_buffer("alphas_cumprod", pipe.scheduler.alphas_cumprod.clone().float(), persistent=False)

    def batch_for_step(self, step: int) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, captions, t, noise, per-pixel loss weights) of one step."""
        rng = np.random.default_rng([self.seed, step])
        comps = [self.seen[i] for i in rng.integers(len(self.seen), size=self.cfg.batch_size)]
        images = np.stack([render(c, rng) for c in comps])
        captions = ["" if rng.random() < self.cfg.cfg_dropout else noisy_caption(c, rng, self.cfg, self.holdout)
                    for c in comps]
        g = torch.Generator().manual_seed(derive_seed(self.seed, f"pretrain:{step}"))
        t = torch.randint(0, len(self.alphas_cumprod), (len(comps),), generator=g)
        noise = torch.randn((len(comps), 3, *images.shape[1:3]), generator=g)
        # Square and circle differ only in their corners, a few percent of the pixels, and
        # only at mid noise does the caption decide them: with an unweighted loss the model
        # learns to ignore the shape word. Weights that depend on the image bias the
        # estimate, though (squares bloat, circles shrink), so the last steps train on the
        # plain loss, which keeps the binding and removes the bias (README, "The synthetic world").
        weights = torch.ones(len(comps), 1, *images.shape[1:3])
        if step < self.cfg.shape_weight_steps:
            corners = np.stack([shape_corners(image, BACKGROUND_RGB[c.background]) for image, c in zip(images, comps)])
            weights += (self.cfg.shape_weight - 1) * torch.from_numpy(corners).float()[:, None]
        return WorldPipeline.from_images(images), captions, t, noise, weights

    def training_step(self, batch, batch_idx):
        x0, captions, t, noise, weights = self.batch_for_step(self.global_step)
        alpha = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        embeds = self.text_encoder(self.pipe.tokenize(captions)).last_hidden_state
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
            for ema, live in ((self.ema_unet, self.unet), (self.ema_text_encoder, self.text_encoder)):
                for e, p in zip(ema.parameters(), live.parameters()):
                    e.lerp_(p, 1 - decay)

    def configure_optimizers(self):
        params = [*self.unet.parameters(), *self.text_encoder.parameters()]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=1e-4)
        warmup, total = self.cfg.warmup_steps, self.cfg.steps

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule),
                                                   "interval": "step"}}

    def ema_pipeline(self) -> WorldPipeline:
        return WorldPipeline(unet=self.ema_unet, text_encoder=self.ema_text_encoder,
                             tokenizer=self.pipe.tokenizer, scheduler=self.pipe.scheduler)


class CurveWriter(L.Callback):
    """Training curve for `dvc plots`: smoothed loss every step, alignment probes of the EMA model."""

    def __init__(self, path: Path, params: Params):
        self.path, self.params = path, params
        self.smoothed: float | None = None
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = float(outputs["loss"])
        self.smoothed = loss if self.smoothed is None else 0.98 * self.smoothed + 0.02 * loss
        step = trainer.global_step
        row = {"step": step, "loss": round(self.smoothed, 5),
               "lr": f"{trainer.optimizers[0].param_groups[0]['lr']:.3g}", "align_seen": "", "align_unseen": ""}
        cfg = self.params.pretrain
        if step % cfg.probe_every == 0 or step == cfg.steps:
            probe = evaluate_splits(module.ema_pipeline(), self.params.world.holdout,
                                    cfg.probe_images_per_composition, self.params.seed,
                                    SamplerConfig.from_params(self.params.sample))
            row["align_seen"], row["align_unseen"] = probe["seen"]["aligned"], probe["unseen"]["aligned"]
        self.rows.append(row)

    def state_dict(self):
        return {"rows": self.rows, "smoothed": self.smoothed}

    def load_state_dict(self, state):
        self.rows, self.smoothed = state["rows"], state["smoothed"]

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CURVE_FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)


def run_key(params: Params) -> str:
    """Checkpoints of one configuration only resume runs of that same configuration."""
    relevant = {"seed": params.seed, "world": params.world.model_dump(), "pretrain": params.pretrain.model_dump()}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


def pretrain(params: Params, root: Path, state_dir: Path) -> dict:
    cfg = params.pretrain
    torch.set_num_threads(cfg.threads)
    L.seed_everything(params.seed, workers=True, verbose=False)
    ckpt_dir = state_dir / "checkpoints" / "pretrain" / run_key(params)
    last = ckpt_dir / "last.ckpt"

    pipe = WorldPipeline.from_config_params(params.world.model, seed=params.seed)
    module = PretrainModule(pipe, params)
    curve = CurveWriter(root / CURVE_OUT, params)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=cfg.checkpoint_every,
                                                      save_last=True, save_top_k=0)
    trainer = L.Trainer(
        max_steps=cfg.steps, accelerator="cpu", devices=1, deterministic=True, logger=False,
        callbacks=[checkpoints, curve, *progress_callbacks("pretrain")], enable_progress_bar=on_terminal(),
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    steps = torch.utils.data.DataLoader(range(cfg.steps), batch_size=1)
    trainer.fit(module, steps, ckpt_path=str(last) if last.exists() else None)

    out = root / MODEL_OUT
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    quiet_model_io()
    module.ema_pipeline().save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    curve.write()
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return curve.rows[-1] if curve.rows else {}


def _stage(project) -> str:
    from components.errors import UserError

    if project.params.profile != "world":
        raise UserError(f"pretrain is for the world profile only (profile: {project.params.profile}); "
                        "GPU profiles load their weights from models.<profile>")
    final = pretrain(project.params, project.root, project.state_dir)
    return f"done; final probe: seen {final.get('align_seen')}, unseen {final.get('align_unseen')}"


def main() -> int:
    return run_stage("pretrain", _stage)


if __name__ == "__main__":
    sys.exit(main())
