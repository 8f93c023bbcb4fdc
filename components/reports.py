"""Headline numbers from the pipeline's metric files, for people and Prefect artifacts."""

from __future__ import annotations

import json
from pathlib import Path

from components.world.alignment import BASE_METRICS_OUT


def headline_metrics(root: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    base = root / BASE_METRICS_OUT
    if base.exists():
        metrics = json.loads(base.read_text())
        for split, label in (("seen", "base, seen"), ("unseen", "base, held-out")):
            values = metrics.get(split, {})
            out[label] = {k: f"{v:.1%}" for k, v in values.items() if k != "images"} | {
                "images": values.get("images")}
    return out
