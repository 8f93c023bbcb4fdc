"""Training curves for `dvc plots`: logged metrics per step, written as CSV at the end."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L


class MetricsCurve(L.Callback):
    """Records the named metrics the LightningModule logs, every ``every`` steps.

    The rows are part of the checkpoint, so a resumed run writes the whole curve.
    """

    def __init__(self, path: Path, fields: list[str], every: int = 1):
        self.path, self.fields, self.every = path, fields, every
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        metrics = trainer.callback_metrics
        self.rows.append({"step": step, **{k: round(float(metrics[k]), 6) if k in metrics else "" for k in self.fields}})

    def state_dict(self):
        return {"rows": self.rows}

    def load_state_dict(self, state):
        self.rows = state["rows"]

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["step", *self.fields])
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)
