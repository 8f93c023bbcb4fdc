"""What the three pre-training stages share: their data, their Trainer and their outputs.

Every batch is a pure function of (seed, stage, step): rendering, caption noise,
timesteps and noise all come from generators seeded by the step, so a run killed and
resumed from its last checkpoint produces the same model as an uninterrupted one.
Checkpoints live under the state dir, keyed by the settings they were trained with.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch

from components import live
from components.config import PretrainParams
from components.models import quiet_model_io
from components.progress import on_terminal, progress_callbacks
from components.world.grammar import BACKGROUNDS, Composition, all_compositions
from components.world.render import render


def is_held_out(c: Composition, holdout: list[str]) -> bool:
    return f"{c.count_word} {c.colour}" in holdout


def seen_compositions(holdout: list[str]) -> list[Composition]:
    return [c for c in all_compositions() if not is_held_out(c, holdout)]


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


def renders(seed: int, stage: str, step: int, size: int, compositions: list[Composition]
            ) -> tuple[np.random.Generator, list[Composition], np.ndarray]:
    """(the step's generator, its compositions, their uint8 renders) for one stage's step."""
    stream = int.from_bytes(hashlib.sha256(stage.encode()).digest()[:4], "big")
    rng = np.random.default_rng([seed, stream, step])
    comps = [compositions[i] for i in rng.integers(len(compositions), size=size)]
    return rng, comps, np.stack([render(c, rng) for c in comps])


def run_key(**settings) -> str:
    """Checkpoints of one configuration only resume runs of that same configuration."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def fit(module: L.LightningModule, stage: str, root: Path, steps: int, checkpoint_every: int, ckpt_dir: Path,
        callbacks: tuple[L.Callback, ...] = ()) -> None:
    """Train ``steps`` steps on CPU, resuming from ``ckpt_dir`` when a run was cut short;
    the loss and learning-rate curves go to ``reports/live/<stage>`` (DVCLive)."""
    last = ckpt_dir / "last.ckpt"
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=checkpoint_every,
                                                      save_last=True, save_top_k=0)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, deterministic=True,
        logger=live.StageLogger(root, stage, resuming=last.exists()), log_every_n_steps=1,
        callbacks=[checkpoints, live.ResumedCurves(), L.pytorch.callbacks.LearningRateMonitor("step"), *callbacks,
                   *progress_callbacks(stage)],
        enable_progress_bar=on_terminal(), enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, torch.utils.data.DataLoader(range(steps), batch_size=1),
                ckpt_path=str(last) if last.exists() else None)


def save_directory(out: Path, save: Callable[[Path], None]) -> None:
    """Write a model directory whole or not at all: into a sibling, then rename."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    quiet_model_io()
    save(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def finish(root: Path, model_out: Path, save: Callable[[Path], None], report_out: Path, report: dict,
           ckpt_dir: Path) -> dict:
    """Write the model and its report, then drop the checkpoints the run no longer needs."""
    save_directory(root / model_out, save)
    (root / report_out).parent.mkdir(parents=True, exist_ok=True)
    (root / report_out).write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return report


def cosine_lr(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> dict:
    """Linear warm-up, then cosine decay to zero at ``total``: Lightning's scheduler config."""
    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + np.cos(np.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), "interval": "step",
            "name": "lr"}  # the curve's name (LearningRateMonitor)


def require_world(params, stage: str) -> None:
    from components.errors import UserError

    if params.profile != "world":
        raise UserError(f"{stage} is for the world profile only (profile: {params.profile}); "
                        "GPU profiles load their weights from models.<profile>")
