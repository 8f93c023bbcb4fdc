"""Training curves and sample grids through DVCLive, DVC's logger for Lightning.

Each training stage logs to ``reports/live/<stage>/`` (a stage output, in git):

- ``plots/metrics/<name>.tsv``: one row per optimizer step, for ``dvc plots`` and VS
  Code's DVC extension; ``step`` counts the optimizer steps done (1 = after the first),
  as checkpoints and progress lines do;
- ``metrics.json``: each metric's last value, for ``dvc metrics`` and ``dvc exp show``;
- ``plots/images/samples/<step>.png``: sample grids at checkpoints (the extension shows
  them as a slider).

Rows carry no timestamps, so a re-run writes the same bytes. A killed run that resumes
from its last checkpoint keeps the rows up to that step and logs the rest again, so its
curves equal an uninterrupted run's.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
from dvclive.fabric import DVCLiveLogger as PlainDVCLiveLogger
from dvclive.lightning import DVCLiveLogger
from lightning.pytorch.utilities import rank_zero_only

LIVE_DIR = Path("reports/live")
METRICS = Path("plots/metrics")
IMAGES = Path("plots/images")


def live_dir(root: Path, stage: str) -> Path:
    return root / LIVE_DIR / stage


class StageLogger(DVCLiveLogger):
    """DVCLive's Lightning logger for one stage's directory.

    Two departures from its defaults: rows are numbered by optimizer steps done
    (Lightning passes the 0-based batch, and DVCLive reads a step of 0 as "none"), and
    the summary is written once, at the end (its per-call sync inspects the stack and
    re-reads every curve: a cost that grows with the run).
    """

    def __init__(self, root: Path, stage: str, resuming: bool):
        super().__init__(dir=str(live_dir(root, stage)), resume=resuming, save_dvc_exp=False, dvcyaml=False)

    @rank_zero_only
    def log_metrics(self, metrics, step=None, sync=False):
        # Lightning adds the epoch: every run here is one epoch over its steps, a flat line
        self.log_at({k: v for k, v in metrics.items() if k != "epoch"}, (step or 0) + 1)

    @rank_zero_only
    def log_at(self, metrics: dict, steps_done: int) -> None:
        """Log ``metrics`` on the row of ``steps_done`` (callbacks' measurements, e.g. probes)."""
        PlainDVCLiveLogger.log_metrics(self, metrics, steps_done, sync=False)

    @rank_zero_only
    def log_image(self, name: str, image: np.ndarray) -> None:
        self.experiment.log_image(name, image)


class ResumedCurves(L.Callback):
    """A run resumed from a checkpoint drops what the killed run logged after it
    (every Trainer with a :class:`StageLogger` has one)."""

    def on_train_start(self, trainer, module):
        if trainer.global_step == 0 or not trainer.is_global_zero:
            return
        logger = trainer.logger
        root = Path(logger.experiment.dir)
        for path in (root / METRICS).rglob("*.tsv"):
            with open(path, newline="") as fh:
                rows = list(csv.reader(fh, delimiter="\t"))
            kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= trainer.global_step]
            with open(path, "w", newline="") as fh:
                csv.writer(fh, delimiter="\t", lineterminator=os.linesep).writerows(kept)
        for image in (root / IMAGES).rglob("*.png"):
            if image.stem.isdigit() and int(image.stem) > trainer.global_step:
                image.unlink()


class SampleGrids(L.Callback):
    """Every ``every`` steps and at the last: a grid of samples of fixed prompts and seeds
    (rows: prompts; columns: seeds), logged as ``samples/<step>.png``."""

    def __init__(self, pipeline: Callable[[L.LightningModule], object], prompts: list[str], seeds: list[int],
                 config, every: int):
        self.pipeline, self.prompts, self.seeds, self.config, self.every = pipeline, prompts, seeds, config, every

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not trainer.is_global_zero or not (step % self.every == 0 or step == trainer.max_steps):
            return
        import torch

        from components.sampling import sample

        pipe = self.pipeline(module)
        jobs = [(p, s) for p in self.prompts for s in self.seeds]
        training = pipe.unet.training
        pipe.unet.eval()
        with torch.no_grad():
            images = sample(pipe, [p for p, _ in jobs], [s for _, s in jobs], self.config, record=False).images
        pipe.unet.train(training)
        trainer.logger.log_image(f"samples/{step}.png", tile(images, len(self.seeds)))


def tile(images: np.ndarray, columns: int, pad: int = 2, scale: int = 2) -> np.ndarray:
    """uint8 images (N, H, W, 3) in rows of ``columns``, white gaps between them."""
    n, h, w = images.shape[:3]
    rows = -(-n // columns)
    canvas = np.full((rows * (h + pad) - pad, columns * (w + pad) - pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        y, x = (i // columns) * (h + pad), (i % columns) * (w + pad)
        canvas[y:y + h, x:x + w] = image
    return canvas.repeat(scale, axis=0).repeat(scale, axis=1)


def curve(root: Path, stage: str, name: str):
    """One logged metric of a stage as a DataFrame (columns ``step`` and ``name``)."""
    import pandas as pd

    return pd.read_csv(live_dir(root, stage) / METRICS / f"{name}.tsv", sep="\t")


def last_values(root: Path, stage: str) -> dict:
    """Each metric's last value and the last step (the run's ``metrics.json``)."""
    import json

    path = live_dir(root, stage) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}
