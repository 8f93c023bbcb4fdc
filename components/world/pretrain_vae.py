"""`pretrain_vae` stage (world profile): the KL autoencoder between renders and latents.

An ``AutoencoderKL`` learns to reconstruct fresh renders of the compositions seen in
pre-training (L1 plus a tiny KL term, as SD's VAE). Its ``scaling_factor`` is then set
from the latents' standard deviation, as SD's was, so the UNet sees unit-variance
latents. Acceptance, measured on fresh renders of every composition: the world judge
gives the same verdict on the decoded image as on the render itself, for the true
prompt and for every prompt that differs in one attribute (the near-misses). The loss
weighs up the pixels the verdict hangs on: shape edges, corners and the gaps between shapes.

Outputs: ``models/vae``, ``reports/pretrain_vae.json`` and the loss curve in
``reports/live/pretrain_vae`` (DVCLive).
Run as a stage: ``python -m components.world.pretrain_vae``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch

from components.config import Params
from components.sampling import to_pixels, to_uint8
from components.world import training
from components.world.grammar import BACKGROUND_RGB, all_compositions
from components.world.judge import judge
from components.world.model import build_vae
from components.world.render import shape_corners

MODEL_OUT = Path("models/vae")
REPORT_OUT = Path("reports/pretrain_vae.json")


class VaeModule(L.LightningModule):
    def __init__(self, params: Params):
        super().__init__()
        self.vae = build_vae(params.world.vae)
        self.cfg, self.seed = params.pretrain_vae, params.seed
        self.compositions = training.seen_compositions(params.world.holdout)

    def training_step(self, batch, batch_idx):
        step = self.global_step
        _, comps, images = training.renders(self.seed, "pretrain_vae", step, self.cfg.batch_size, self.compositions)
        x = to_pixels(images)
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator=torch.Generator().manual_seed(self.seed * 1_000_003 + step))
        reconstruction = self.vae.decode(z).sample
        weights = 1 + (self.cfg.edge_weight - 1) * torch.from_numpy(details(images, comps)).float()[:, None]
        l1 = (weights * (reconstruction - x).abs()).mean() / weights.mean()
        loss = l1 + self.cfg.kl_weight * posterior.kl().mean()
        self.log("loss", l1, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.vae.parameters(), lr=self.cfg.lr, weight_decay=1e-4)
        return {"optimizer": opt, "lr_scheduler": training.cosine_lr(opt, 50, self.cfg.steps)}


def details(images: np.ndarray, comps) -> np.ndarray:
    """Bool (B, H, W): the pixels the judge's verdict hangs on. A square's corners are a few
    single pixels and tell it from a circle; shapes in neighbouring cells can be 2 px
    apart, and a blurred gap merges them into one blob. Unweighted, the decoder rounds
    corners off and bridges gaps (measured: 82% judge agreement, then 97% with corners only)."""
    x = images.astype(np.int16)
    edges = np.zeros(x.shape[:3], dtype=bool)
    for axis in (1, 2):
        step = np.any(np.diff(x, axis=axis) != 0, axis=-1)
        lead = [slice(None)] * 3
        lead[axis] = slice(1, None)
        trail = [slice(None)] * 3
        trail[axis] = slice(None, -1)
        edges[tuple(lead)] |= step
        edges[tuple(trail)] |= step
    corners = np.stack([shape_corners(image, BACKGROUND_RGB[c.background]) for image, c in zip(images, comps)])
    return edges | corners


@torch.no_grad()
def round_trip(vae, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, torch.Tensor]:
    """(decoded uint8 images, unscaled latent means) of uint8 images."""
    decoded, latents = [], []
    for start in range(0, len(images), batch_size):
        z = vae.encode(to_pixels(images[start:start + batch_size])).latent_dist.mode()
        latents.append(z)
        decoded.append(to_uint8(vae.decode(z).sample))
    return np.concatenate(decoded), torch.cat(latents)


def judge_agreement(originals: np.ndarray, decoded: np.ndarray, compositions) -> dict:
    """Share of images whose verdict is the same before and after the round trip, for the
    true prompt and for every near-miss (one attribute changed)."""
    same_true = same_all = 0
    for original, image, c in zip(originals, decoded, compositions):
        prompts = [c, *c.perturbations()]
        agree = [judge(original, p).aligned == judge(image, p).aligned for p in prompts]
        same_true += agree[0]
        same_all += all(agree)
    n = len(compositions)
    return {"images": n, "true_prompt": round(same_true / n, 4), "near_misses_included": round(same_all / n, 4)}


def pretrain_vae(params: Params, root: Path, state_dir: Path) -> dict:
    cfg = params.pretrain_vae
    torch.set_num_threads(cfg.threads)
    L.seed_everything(params.seed, workers=True, verbose=False)
    key = training.run_key(seed=params.seed, holdout=params.world.holdout, vae=params.world.vae.model_dump(),
                           pretrain_vae=cfg.model_dump())
    ckpt_dir = state_dir / "checkpoints" / "pretrain_vae" / key
    module = VaeModule(params)
    training.fit(module, "pretrain_vae", root, cfg.steps, cfg.checkpoint_every, ckpt_dir)
    vae = module.vae.eval()

    # fresh renders of all 96 compositions (held-out ones too: the base will draw them)
    _, comps, images = training.renders(params.seed, "pretrain_vae:check", 0, cfg.judge_images, all_compositions())
    decoded, latents = round_trip(vae, images)
    vae.register_to_config(scaling_factor=round(1.0 / float(latents.std()), 5))
    report = {"scaling_factor": vae.config.scaling_factor,
              "pixel_error": round(float(np.abs(decoded.astype(np.float32) - images).mean()), 3),
              "judge_agreement": judge_agreement(images, decoded, comps)}
    return training.finish(root, MODEL_OUT, vae.save_pretrained, REPORT_OUT, report, ckpt_dir)


def _stage(project) -> str:
    training.require_world(project.params, "pretrain_vae")
    report = pretrain_vae(project.params, project.root, project.state_dir)
    agreement = report["judge_agreement"]
    return (f"judge agrees on {agreement['near_misses_included']:.1%} of {agreement['images']} decoded renders "
            f"(near-misses included); pixel error {report['pixel_error']}/255")


def main() -> int:
    from components.stage import run_stage

    return run_stage("pretrain_vae", _stage)


if __name__ == "__main__":
    sys.exit(main())
