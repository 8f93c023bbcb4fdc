"""A label snapshot made directly by the simulated annotators' policy, without Label Studio.

For benchmarks and training tests that need labels at a scale where the round trip
through Label Studio (tested on its own in the annotation loop) would only cost time.
The annotators decide exactly as in :mod:`components.annotation.simulate`; the tables
have the snapshot's schema (``annotations.parquet``, ``tasks.parquet``, ``preferences.parquet``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from components.annotation.simulate import AnnotatorConfig, _rng, decide
from components.annotation.snapshot import PREFERENCE_COLUMNS, preferences
from components.world.judge import judge


def units(gens: pd.DataFrame, binary: bool = True, pairwise: bool = True) -> list[tuple[str, list[str]]]:
    """The tasks a round would push, as (kind, generation ids): one binary task per
    generation and one pairwise task per shared-noise pair."""
    out = []
    if binary:
        out += [("binary", [g]) for g in gens.index]
    if pairwise:
        for _, group in gens.groupby(["prompt_id", "noise_group"], sort=True):
            ids = sorted(group.index)
            out += [("pairwise", ids[i:i + 2]) for i in range(0, len(ids) - 1, 2)]
    return out


def label(gens: pd.DataFrame, images: dict[str, np.ndarray], config: AnnotatorConfig, binary: bool = True,
          pairwise: bool = True, only: set[int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(tasks, preferences): the :func:`units` as tasks, each with ``config.coverage`` votes.
    ``only``: label just these task ids (indices into :func:`units`); a task's votes do
    not depend on which others are labelled."""
    rows = []
    for task_id, (kind, ids) in enumerate(units(gens, binary, pairwise)):
        if only is not None and task_id not in only:
            continue
        prompt = gens.at[ids[0], "prompt"]
        verdicts = [judge(images[g], prompt) for g in ids]
        votes: dict[str, int] = {}
        for annotator in range(config.coverage):
            choice, _ = decide(kind, verdicts, _rng(config.seed, task_id, annotator), config)
            votes[choice] = votes.get(choice, 0) + 1
        top = max(votes.values())
        leaders = sorted(c for c, n in votes.items() if n == top)
        rows.append({"task_id": task_id, "kind": kind, "prompt": prompt, "generation_ids": ids,
                     "votes": json.dumps(dict(sorted(votes.items()))),
                     "majority": leaders[0] if len(leaders) == 1 else "tie",
                     "majority_share": round(top / config.coverage, 4), "annotators": config.coverage})
    tasks = pd.DataFrame(rows)
    prefs = preferences(tasks) if len(tasks) else pd.DataFrame(columns=PREFERENCE_COLUMNS)
    return tasks, prefs


def votes(tasks: pd.DataFrame) -> pd.DataFrame:
    """One row per vote, as the snapshot's annotations table has them."""
    rows = [{"annotation_id": 0, "task_id": t.task_id, "generation_ids": t.generation_ids, "prompt": t.prompt,
             "annotator": f"simulated-{i}", "choice": choice, "status": "submitted"}
            for t in tasks.itertuples() for i, choice in enumerate(
                c for c, n in json.loads(t.votes).items() for _ in range(n))]
    frame = pd.DataFrame(rows, columns=list(rows[0]) if rows else ["annotation_id", "task_id"])
    frame["annotation_id"] = np.arange(1, len(frame) + 1)
    return frame


def write(tasks: pd.DataFrame, prefs: pd.DataFrame, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    votes(tasks).to_parquet(out_dir / "annotations.parquet", index=False)
    tasks.to_parquet(out_dir / "tasks.parquet", index=False)
    prefs.to_parquet(out_dir / "preferences.parquet", index=False)
