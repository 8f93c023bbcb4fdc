"""`pretrain_clip` stage (world profile): a CLIP of the world, trained contrastively here.

A ``CLIPModel`` (word-level text tower, small ViT over 32×32 renders) learns to match
renders of the compositions seen in pre-training with their captions — noisy as the
base model's captions are (``pretrain.caption_noise``), and never a held-out count×colour
pair. A batch holds the same caption several times, so the contrastive targets are
every matching caption, not only the diagonal. Its text tower becomes the base
pipeline's frozen text encoder; both towers are the frozen encoder under the reward heads.

Outputs: ``models/clip`` (model, tokenizer, image processor: ``from_pretrained``-ready),
``reports/pretrain_clip.json`` (zero-shot prompt retrieval on fresh renders) and the loss
curve in ``reports/live/pretrain_clip`` (DVCLive).
Run as a stage: ``python -m components.world.pretrain_clip``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from components.config import Params
from components.sampling import to_pixels
from components.world import training
from components.reward.model import embed_images, embed_text
from components.world.alignment import split_compositions
from components.world.grammar import ATTRIBUTES, all_compositions
from components.world.model import MAX_TOKENS, build_clip, build_tokenizer, save_clip
from components.world.render import render

MODEL_OUT = Path("models/clip")
REPORT_OUT = Path("reports/pretrain_clip.json")


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                     return_tensors="pt").input_ids


class ClipModule(L.LightningModule):
    def __init__(self, params: Params):
        super().__init__()
        self.tokenizer = build_tokenizer()
        self.clip = build_clip(params.world.clip, self.tokenizer)
        self.cfg, self.seed = params.pretrain_clip, params.seed
        self.noise, self.holdout = params.pretrain, params.world.holdout
        self.compositions = training.seen_compositions(params.world.holdout)

    def training_step(self, batch, batch_idx):
        rng, comps, images = training.renders(self.seed, "pretrain_clip", self.global_step, self.cfg.batch_size,
                                              self.compositions)
        captions = [training.noisy_caption(c, rng, self.noise, self.holdout) for c in comps]
        out = self.clip(input_ids=tokenize(self.tokenizer, captions), pixel_values=to_pixels(images))
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        targets = same / same.sum(dim=1, keepdim=True)
        loss = (F.cross_entropy(out.logits_per_image, targets) + F.cross_entropy(out.logits_per_text, targets)) / 2
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.clip.parameters(), lr=self.cfg.lr, weight_decay=1e-4)
        return {"optimizer": opt, "lr_scheduler": training.cosine_lr(opt, 50, self.cfg.steps)}


@torch.no_grad()
def retrieval(clip, tokenizer, params: Params, per_composition: int = 8) -> dict:
    """Zero-shot, on fresh renders of seen and of held-out compositions: how often the
    nearest of the 96 prompts describes the image (whole and per attribute), and the
    mean CLIP score (cosine) of the true prompt."""
    comps = all_compositions()
    text = embed_text(clip, tokenize(tokenizer, [c.prompt for c in comps]))
    report = {}
    for split, members in split_compositions(params.world.holdout).items():
        jobs = [c for c in members for _ in range(per_composition)]
        rng = np.random.default_rng([params.seed, len(jobs)])
        image = embed_images(clip, to_pixels(np.stack([render(c, rng) for c in jobs])))
        found = [comps[i] for i in (image @ text.T).argmax(dim=1).tolist()]
        truth = torch.tensor([comps.index(c) for c in jobs])
        report[split] = {"images": len(jobs), "prompt": _share(f == c for f, c in zip(found, jobs)),
                         **{a: _share(f.value(a) == c.value(a) for f, c in zip(found, jobs)) for a in ATTRIBUTES},
                         "clip_score": round(float((image * text[truth]).sum(dim=1).mean()), 4)}
    return report


def _share(flags) -> float:
    return round(float(np.mean(list(flags))), 4)


def pretrain_clip(params: Params, root: Path, state_dir: Path) -> dict:
    cfg = params.pretrain_clip
    torch.set_num_threads(cfg.threads)
    L.seed_everything(params.seed, workers=True, verbose=False)
    key = training.run_key(seed=params.seed, holdout=params.world.holdout, clip=params.world.clip.model_dump(),
                           noise=params.pretrain.caption_noise.model_dump(), pretrain_clip=cfg.model_dump())
    ckpt_dir = state_dir / "checkpoints" / "pretrain_clip" / key
    module = ClipModule(params)
    training.fit(module, "pretrain_clip", root, cfg.steps, cfg.checkpoint_every, ckpt_dir)
    clip = module.clip.eval()
    report = {"retrieval": retrieval(clip, module.tokenizer, params)}
    return training.finish(root, MODEL_OUT, lambda where: save_clip(clip, module.tokenizer, where), REPORT_OUT,
                           report, ckpt_dir)


def _stage(project) -> str:
    training.require_world(project.params, "pretrain_clip")
    found = pretrain_clip(project.params, project.root, project.state_dir)["retrieval"]
    return (f"zero-shot prompt retrieval {found['seen']['prompt']:.1%} on seen, "
            f"{found['unseen']['prompt']:.1%} on held-out compositions")


def main() -> int:
    from components.stage import run_stage

    return run_stage("pretrain_clip", _stage)


if __name__ == "__main__":
    sys.exit(main())
