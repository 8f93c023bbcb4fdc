"""Headline numbers from the pipeline's metric files, for people and Prefect artifacts."""

from __future__ import annotations

import base64
import json
import re
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
    evaluation = root / "reports" / "evaluation.json"
    if evaluation.exists():  # candidate against production, when a retrain evaluated one
        metrics = json.loads(evaluation.read_text())
        row = {"learned-reward win rate": metrics.get("reward", {}).get("win_rate"),
               "diversity drop": metrics.get("diversity", {}).get("drop"),
               "near-copy rate": metrics.get("memorization", {}).get("near_copy_rate")}
        judge = metrics.get("judge", {})
        if judge:
            row |= {"judge aligned, production": f"{judge['production']['all']['aligned']:.1%}",
                    "judge aligned, candidate": f"{judge['candidate']['all']['aligned']:.1%}"}
        out["candidate vs production"] = {k: v for k, v in row.items() if v is not None}
    return out


def inline_images(markdown: str, folder: Path) -> str:
    """Markdown whose relative image links (``![alt](grid.png)``) carry the image itself as a
    data URI: a Prefect artifact is viewed in a browser that cannot read this machine's files."""
    def embed(match: re.Match) -> str:
        path = folder / match.group(2)
        if not path.is_file():
            return match.group(0)
        return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"

    return re.sub(r"!\[([^\]]*)\]\(([^)/:]+\.png)\)", embed, markdown)
