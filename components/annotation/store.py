"""The local annotation store: what annotators did in Label Studio, never lost or doubled.

One store per Label Studio project, under ``<state>/annotations/<project id>/``:

- ``annotations.parquet`` — one row per Label Studio annotation id (its latest
  version): task, generations, annotator, choice, critique, status
  (``submitted`` | ``skipped`` | ``deleted``), Label Studio's timestamps;
- ``rejected.parquet`` — results that did not match the labeling config, with the reason;
- ``watermark.json`` — the newest task ``updated_at`` fully stored.

Writes go to a temporary file renamed into place, and the watermark moves only after
the rows are on disk, so a crash at any point loses nothing; rows are keyed by
annotation id, so a re-run that fetches the same tasks again changes nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

ANNOTATION_COLUMNS = ["annotation_id", "task_id", "project_id", "external_id", "generation_ids", "prompt",
                      "annotator", "choice", "critique", "status", "created_at", "updated_at"]
REJECTED_COLUMNS = ["annotation_id", "task_id", "project_id", "reason", "updated_at"]


class AnnotationStore:
    def __init__(self, root: Path):
        self.root = root
        self.annotations_path = root / "annotations.parquet"
        self.rejected_path = root / "rejected.parquet"
        self.watermark_path = root / "watermark.json"
        self.lock_path = root / "sync.lock"

    def annotations(self) -> pd.DataFrame:
        if self.annotations_path.exists():
            return pd.read_parquet(self.annotations_path)
        return pd.DataFrame(columns=ANNOTATION_COLUMNS)

    def rejected(self) -> pd.DataFrame:
        if self.rejected_path.exists():
            return pd.read_parquet(self.rejected_path)
        return pd.DataFrame(columns=REJECTED_COLUMNS)

    def watermark(self) -> str | None:
        if not self.watermark_path.exists():
            return None
        return json.loads(self.watermark_path.read_text())["updated_at"]

    def commit(self, rows: list[dict], rejected: list[dict], deleted_ids: list[int], watermark: str | None) -> dict:
        """Upsert rows, mark deletions, record rejections; then (and only then) move the watermark."""
        self.root.mkdir(parents=True, exist_ok=True)
        current = self.annotations()
        before = len(current)
        changes = pd.DataFrame(rows, columns=ANNOTATION_COLUMNS)
        merged = pd.concat([current[~current["annotation_id"].isin(changes["annotation_id"])], changes],
                           ignore_index=True)
        newly_deleted = merged["annotation_id"].isin(deleted_ids) & (merged["status"] != "deleted")
        merged.loc[newly_deleted, "status"] = "deleted"
        merged = merged.sort_values("annotation_id", kind="stable").reset_index(drop=True)
        _atomic_parquet(merged, self.annotations_path)

        rejected_frame = pd.concat([self.rejected(), pd.DataFrame(rejected, columns=REJECTED_COLUMNS)],
                                   ignore_index=True).drop_duplicates(["annotation_id", "updated_at"], keep="last")
        _atomic_parquet(rejected_frame, self.rejected_path)

        if watermark is not None:
            tmp = self.watermark_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"updated_at": watermark}))
            os.replace(tmp, self.watermark_path)
        return {"stored": len(merged), "new": len(merged) - before, "deleted": int(newly_deleted.sum())}


def _atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    frame.to_parquet(tmp, index=False)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
