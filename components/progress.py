"""Training progress where no terminal shows Lightning's bar.

The bar only draws on a terminal: under a Prefect worker, `make demo > log` or CI, a
25-minute pre-training would say nothing until it ends. There the trainers print a
plain line after the first step and every ~5% after it: ``pretrain: step 400/1600 (25%),
loss 0.0512, 6m12s elapsed, ETA 18m36s`` (no ETA on the first: one step is no rate).
"""

from __future__ import annotations

import sys
import time

import lightning as L


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class ProgressLines(L.Callback):
    def __init__(self, label: str, lines: int = 20):
        self.label, self.lines = label, lines
        self.start, self.next_step = 0.0, 0
        self.rate_origin: tuple[int, float] | None = None

    def on_train_start(self, trainer, module):
        self.start, self.rate_origin = time.monotonic(), None
        self.next_step = trainer.global_step + 1  # a resumed run counts from its checkpoint

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step, total = trainer.global_step, trainer.max_steps
        if step < self.next_step and step != total:
            return
        self.next_step = step + max(1, total // self.lines)
        now = time.monotonic()
        elapsed = now - self.start
        # the first step carries the start-up (threads, data, first graph), so the rate counts from its end
        if self.rate_origin is None:
            self.rate_origin, rate = (step, now), 0.0
        else:
            origin_step, origin_time = self.rate_origin
            rate = (step - origin_step) / (now - origin_time) if now > origin_time else 0.0
        loss = trainer.callback_metrics.get("loss")
        parts = [f"{self.label}: step {step}/{total} ({100 * step // max(total, 1)}%)"]
        if loss is not None:
            parts.append(f"loss {float(loss):.4g}")
        parts.append(f"{_duration(elapsed)} elapsed")
        if rate > 0 and step < total:
            parts.append(f"ETA {_duration((total - step) / rate)}")
        print(", ".join(parts), flush=True)


def on_terminal() -> bool:
    """Whether Lightning's bar can draw (otherwise :func:`progress_callbacks` print lines)."""
    return sys.stdout.isatty()


def progress_callbacks(label: str) -> list[L.Callback]:
    return [] if on_terminal() else [ProgressLines(label)]
