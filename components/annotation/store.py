"""The local annotation store: what annotators did in Label Studio, never lost or doubled.

One store per Label Studio project, under ``<state>/annotations/<project id>/``:

- ``annotations.parquet`` — exactly one row per Label Studio annotation id, its latest
  version by Label Studio's own ``updated_at``: task, generations, annotator, choice,
  critique, status (``submitted`` | ``skipped`` | ``rejected`` — edited into a result
  that does not match the labeling config, so its earlier label is withdrawn — |
  ``deleted``), Label Studio's timestamps;
- ``rejected.parquet`` — results that did not match the labeling config, with the reason;
- ``tasks.json`` — the ids of the project's tasks at the last sync (to notice deletions);
- ``watermark.json`` — a time on Label Studio's clock before which every change is stored.

Writes go to a temporary file renamed into place, and the watermark moves only after
the rows are on disk, so a crash at any point loses nothing; rows are keyed by
annotation id and the newest version wins, so re-reading a task, in any order, never
adds a row or brings back an older label.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from components.files import read_json, read_parquet

# A damaged bookkeeping file costs a re-read at worst: the store is keyed by annotation id.
_REREAD = "delete it and sync again (a sync re-reads what it needs; nothing is doubled)"
ANNOTATION_COLUMNS = ["annotation_id", "task_id", "project_id", "external_id", "generation_ids", "prompt",
                      "annotator", "choice", "critique", "status", "created_at", "updated_at"]
REJECTED_COLUMNS = ["annotation_id", "task_id", "project_id", "reason", "updated_at"]
STATUSES = ("submitted", "skipped", "rejected", "deleted")


class AnnotationStore:
    def __init__(self, root: Path):
        self.root = root
        self.annotations_path = root / "annotations.parquet"
        self.rejected_path = root / "rejected.parquet"
        self.watermark_path = root / "watermark.json"
        self.tasks_path = root / "tasks.json"
        self.lock_path = root / "sync.lock"

    def annotations(self) -> pd.DataFrame:
        if self.annotations_path.exists():
            return read_parquet(self.annotations_path, "restore it from a backup; it holds the stored labels")
        return pd.DataFrame(columns=ANNOTATION_COLUMNS)

    def rejected(self) -> pd.DataFrame:
        if self.rejected_path.exists():
            return read_parquet(self.rejected_path, _REREAD)
        return pd.DataFrame(columns=REJECTED_COLUMNS)

    def watermark(self) -> str | None:
        if not self.watermark_path.exists():
            return None
        return read_json(self.watermark_path, _REREAD, ("updated_at",))["updated_at"]

    def task_ids(self) -> set[int] | None:
        """The project's task ids as of the last sync; None before the first."""
        if not self.tasks_path.exists():
            return None
        return set(read_json(self.tasks_path, _REREAD, ("task_ids",))["task_ids"])

    def commit(self, rows: list[dict], rejected: list[dict], deleted_ids: list[int], watermark: str | None,
               task_ids: set[int] | None = None) -> dict:
        """Upsert rows (newest version of each id wins), mark deletions, record rejections
        and the live task ids; then (and only then) move the watermark."""
        self.root.mkdir(parents=True, exist_ok=True)
        current = self.annotations()
        before = set(current["annotation_id"].astype(int))
        merged = latest_versions(pd.concat([current, pd.DataFrame(rows, columns=ANNOTATION_COLUMNS)],
                                           ignore_index=True))
        newly_deleted = merged["annotation_id"].isin(deleted_ids) & (merged["status"] != "deleted")
        merged.loc[newly_deleted, "status"] = "deleted"
        withdrawn = merged["status"].isin(["rejected", "deleted"])
        merged.loc[withdrawn, "choice"] = None
        _atomic_parquet(merged, self.annotations_path)

        rejected_frame = pd.concat([self.rejected(), pd.DataFrame(rejected, columns=REJECTED_COLUMNS)],
                                   ignore_index=True).drop_duplicates(["annotation_id", "updated_at"], keep="last")
        _atomic_parquet(rejected_frame, self.rejected_path)

        if task_ids is not None:
            _atomic_json({"task_ids": sorted(task_ids)}, self.tasks_path)
        if watermark is not None:
            _atomic_json({"updated_at": watermark}, self.watermark_path)
        return {"stored": len(merged), "new": len(set(merged["annotation_id"].astype(int)) - before),
                "deleted": int(newly_deleted.sum())}


def latest_versions(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per annotation id: the one with the newest ``updated_at`` (the later row on a tie)."""
    when = pd.to_datetime(rows["updated_at"], utc=True, format="ISO8601")
    ordered = rows.assign(_when=when).sort_values("_when", kind="stable")
    latest = ordered.drop_duplicates("annotation_id", keep="last").drop(columns="_when")
    return latest.sort_values("annotation_id", kind="stable").reset_index(drop=True)


def _atomic_json(value: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    frame.to_parquet(tmp, index=False)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
