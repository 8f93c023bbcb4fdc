"""Freeze the annotation stores into a versioned label dataset (the retrain pipeline's input).

From every store under ``<state>/annotations/``: submitted annotations only
(deleted ones dropped, skipped ones counted) of the generations the labels are for —
annotations of images an earlier base model or sampler made are counted as ``stale``
and stay in the stores (the trainers pair labels with the current generations, whose
trajectories they replay), then

- ``tasks``: per task and kind, the votes, the majority choice (``tie`` when votes
  split evenly between the top choices), the annotator count and the share of
  votes for the majority;
- ``preferences``: (prompt, winner, loser, weight) — from pairwise majorities
  (weight = majority share; ties give no pair), best-of-k majorities (the best image
  ≻ each of the other k−1) and, within a prompt, binary majorities (every good image
  ≻ every bad one, weight = the lower of the two shares);
- agreement: Krippendorff's α (nominal) per kind, which handles tasks labelled by
  different numbers of annotators.

Pick-a-Pic columns (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``) convert both ways.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd

from components.annotation.store import AnnotationStore

LABELS_DIR = Path("data/labels")
REPORT_OUT = Path("reports/labels.json")
PREFERENCE_COLUMNS = ["prompt", "winner", "loser", "weight", "source_task"]
PAIRWISE_WINNER = {"left": 0, "right": 1}


def load_stores(state_dir: Path) -> tuple[pd.DataFrame, int]:
    """All stored annotations of every project, and how many were skipped."""
    frames = []
    for path in sorted((state_dir / "annotations").glob("*/annotations.parquet")):
        frames.append(AnnotationStore(path.parent).annotations())
    if not frames:
        return pd.DataFrame(), 0
    rows = pd.concat(frames, ignore_index=True)
    skipped = int((rows["status"] == "skipped").sum())
    return rows[rows["status"] == "submitted"].reset_index(drop=True), skipped


def kind_of(row) -> str:
    if row["choice"] in ("good", "bad"):
        return "binary"
    if row["choice"] in ("left", "right", "tie"):
        return "pairwise"
    return "best_of_k"


def aggregate_tasks(annotations: pd.DataFrame) -> pd.DataFrame:
    out = []
    for task_id, group in annotations.groupby("task_id", sort=True):
        votes = Counter(group["choice"])
        ranked = votes.most_common()
        top = ranked[0][1]
        leaders = sorted(c for c, n in ranked if n == top)
        first = group.iloc[0]
        out.append({
            "task_id": int(task_id), "kind": kind_of(first), "prompt": first["prompt"],
            "generation_ids": list(first["generation_ids"]), "votes": json.dumps(dict(sorted(votes.items()))),
            "majority": leaders[0] if len(leaders) == 1 else "tie", "majority_share": round(top / len(group), 4),
            "annotators": int(group["annotator"].nunique()),
        })
    return pd.DataFrame(out)


def krippendorff_alpha(annotations: pd.DataFrame) -> float | None:
    """Nominal α over tasks with at least two labels; None when undefined."""
    units = [list(g["choice"]) for _, g in annotations.groupby("task_id") if len(g) >= 2]
    if not units:
        return None
    coincidence: Counter = Counter()
    for values in units:
        m = len(values)
        for a, b in product(range(m), repeat=2):
            if a != b:
                coincidence[(values[a], values[b])] += 1 / (m - 1)
    categories = sorted({c for pair in coincidence for c in pair})
    totals = {c: sum(v for (a, _), v in coincidence.items() if a == c) for c in categories}
    n = sum(totals.values())
    observed = sum(v for (a, b), v in coincidence.items() if a != b)
    expected = sum(totals[a] * totals[b] for a in categories for b in categories if a != b) / (n - 1)
    return None if expected == 0 else round(1 - observed / expected, 4)


def preferences(tasks: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for t in tasks[tasks["kind"] == "pairwise"].itertuples():
        if t.majority in PAIRWISE_WINNER:
            w = PAIRWISE_WINNER[t.majority]
            rows.append({"prompt": t.prompt, "winner": t.generation_ids[w], "loser": t.generation_ids[1 - w],
                         "weight": t.majority_share, "source_task": t.task_id})
    for t in tasks[(tasks["kind"] == "best_of_k") & (tasks["majority"] != "tie")].itertuples():
        w = int(t.majority.removeprefix("image ")) - 1  # the best image beats each of the other k−1
        rows += [{"prompt": t.prompt, "winner": t.generation_ids[w], "loser": g, "weight": t.majority_share,
                  "source_task": t.task_id} for i, g in enumerate(t.generation_ids) if i != w]
    binary = tasks[(tasks["kind"] == "binary") & (tasks["majority"] != "tie")]
    for prompt, group in binary.groupby("prompt", sort=True):
        good = group[group["majority"] == "good"]
        bad = group[group["majority"] == "bad"]
        for g, b in product(good.itertuples(), bad.itertuples()):
            rows.append({"prompt": prompt, "winner": g.generation_ids[0], "loser": b.generation_ids[0],
                         "weight": min(g.majority_share, b.majority_share), "source_task": -1})
    return pd.DataFrame(rows, columns=PREFERENCE_COLUMNS)


def snapshot(state_dir: Path, out_dir: Path, report_path: Path, generations: set[str] | None = None) -> dict:
    """``generations``: the ids the snapshot may name (None: every stored annotation)."""
    annotations, skipped = load_stores(state_dir)
    stale = 0
    if generations is not None and len(annotations):
        current = annotations["generation_ids"].map(lambda ids: set(ids) <= generations)
        stale = int((~current).sum())
        annotations = annotations[current].reset_index(drop=True)
    tasks = aggregate_tasks(annotations) if len(annotations) else pd.DataFrame()
    prefs = preferences(tasks) if len(tasks) else pd.DataFrame(columns=PREFERENCE_COLUMNS)
    report = {
        "annotations": int(len(annotations)), "skipped": skipped, "stale": stale, "tasks": int(len(tasks)),
        "preferences": int(len(prefs)),
        "annotators": int(annotations["annotator"].nunique()) if len(annotations) else 0,
        "agreement_alpha": {kind: krippendorff_alpha(annotations[annotations.apply(kind_of, axis=1) == kind])
                            for kind in sorted(set(tasks["kind"]))} if len(tasks) else {},
        "ties": int((tasks["majority"] == "tie").sum()) if len(tasks) else 0,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in (("annotations", annotations), ("tasks", tasks), ("preferences", prefs)):
        frame = frame.sort_values(list(frame.columns[:1])).reset_index(drop=True) if len(frame) else frame
        tmp = out_dir / f"{name}.parquet.tmp"
        frame.to_parquet(tmp, index=False)
        tmp.replace(out_dir / f"{name}.parquet")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


# ---- Pick-a-Pic ------------------------------------------------------------------

def to_pickapic(prefs: pd.DataFrame, image_bytes) -> pd.DataFrame:
    """Pick-a-Pic columns; ``image_bytes(generation_id) -> bytes`` supplies the images."""
    return pd.DataFrame({
        "caption": prefs["prompt"],
        "jpg_0": [image_bytes(g) for g in prefs["winner"]],
        "jpg_1": [image_bytes(g) for g in prefs["loser"]],
        "label_0": np.ones(len(prefs)),
    })


def from_pickapic(frame: pd.DataFrame, store_image) -> pd.DataFrame:
    """Preference rows from Pick-a-Pic columns; ``store_image(bytes) -> generation id``.

    ``label_0`` is 1 (image 0 preferred), 0 (image 1) or 0.5 (tie, dropped).
    """
    missing = {"caption", "jpg_0", "jpg_1", "label_0"} - set(frame.columns)
    if missing:
        raise ValueError(f"not a Pick-a-Pic table: missing columns {sorted(missing)}")
    rows = []
    for i, r in enumerate(frame.itertuples()):
        if r.label_0 not in (0, 0.5, 1):
            raise ValueError(f"row {i}: label_0 must be 0, 0.5 or 1, got {r.label_0!r}")
        if r.label_0 == 0.5:
            continue
        first, second = store_image(r.jpg_0), store_image(r.jpg_1)
        winner, loser = (first, second) if r.label_0 == 1 else (second, first)
        rows.append({"prompt": r.caption, "winner": winner, "loser": loser, "weight": 1.0, "source_task": -1})
    return pd.DataFrame(rows, columns=PREFERENCE_COLUMNS)
