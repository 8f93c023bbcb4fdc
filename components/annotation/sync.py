"""Incremental sync: pull what changed in a Label Studio project into the local store.

Only tasks whose ``updated_at`` is past the watermark are fetched (a Data Manager
filter, paged), so a sync costs what changed, not the size of the project. Each
changed task's annotations come with it in the page (``fields=all``), so a sync makes
one request per page, not per task: new and edited ones are upserted by
annotation id, ones that vanished are marked deleted, skipped ones are kept as
``skipped``, and results that do not match the labeling config (Label Studio stores
them anyway) are rejected with a reason while the sync goes on. Concurrent syncs of
one store serialise on a lock.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import httpx

from components.annotation.labeling import InvalidResult, RoundKind, parse_result
from components.annotation.store import AnnotationStore
from components.errors import ServiceError
from components.locking import file_lock
from components.project import Project

# Label Studio compares timestamps at sub-second precision; re-reading the boundary
# second is harmless (upserts are idempotent) and never misses a task.
_OVERLAP = timedelta(seconds=1)


def store_for(project: Project, ls_project_id: int) -> AnnotationStore:
    return AnnotationStore(project.state_dir / "annotations" / str(ls_project_id))


def _iso(value) -> str:
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.astimezone(timezone.utc).isoformat()


def changed_tasks(client, ls_project_id: int, watermark: str | None, page_size: int = 100) -> list:
    query = {"ordering": ["updated_at"]}
    if watermark:
        since = (datetime.fromisoformat(watermark) - _OVERLAP).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # its format
        query["filters"] = {"conjunction": "and", "items": [
            {"filter": "filter:tasks:updated_at", "operator": "greater", "type": "Datetime", "value": since}]}
    return list(client.tasks.list(project=ls_project_id, query=json.dumps(query), fields="all", page_size=page_size))


def task_annotations(client, task) -> list:
    """The task's annotations, as listed in its page; asked for separately only if absent."""
    from label_studio_sdk.types import Annotation

    inline = getattr(task, "annotations", None)
    if inline is None:
        return list(client.annotations.list(id=task.id))
    return [a if isinstance(a, Annotation) else Annotation.model_validate(a) for a in inline]


def sync(project: Project, ls_project_id: int, kind: RoundKind, k: int = 2, client=None, on_progress=None) -> dict:
    """Bring the store up to date with the project; returns counts for the round summary.

    ``on_progress(done, total)`` as each changed task is read."""
    from components.annotation.studio import client_for

    client = client or client_for(project)
    store = store_for(project, ls_project_id)
    store.root.mkdir(parents=True, exist_ok=True)
    with file_lock(store.lock_path):
        try:
            return _sync_locked(client, store, ls_project_id, kind, k, on_progress)
        except (httpx.TransportError, OSError) as exc:
            raise ServiceError(f"Label Studio at {project.label_studio_url} became unreachable during sync "
                               f"({type(exc).__name__}); nothing was stored, run the sync again") from None


def _sync_locked(client, store: AnnotationStore, ls_project_id: int, kind: RoundKind, k: int, on_progress=None) -> dict:
    watermark = store.watermark()
    tasks = changed_tasks(client, ls_project_id, watermark)
    known = store.annotations()
    users: dict[int, str] = {}
    rows, rejected, deleted = [], [], []
    for done, task in enumerate(tasks, start=1):
        if on_progress:
            on_progress(done, len(tasks))
        data = task.data or {}
        annotations = task_annotations(client, task)
        present = {a.id for a in annotations}
        deleted += [int(i) for i in known.loc[known["task_id"] == task.id, "annotation_id"] if int(i) not in present]
        for a in annotations:
            updated = _iso(a.updated_at or a.created_at)
            if not data.get("external_id") or not data.get("generation_ids"):
                rejected.append({"annotation_id": a.id, "task_id": task.id, "project_id": ls_project_id,
                                 "reason": "task was not pushed by aligndiff (no external_id/generation_ids)",
                                 "updated_at": updated})
                continue
            row = {"annotation_id": a.id, "task_id": task.id, "project_id": ls_project_id,
                   "external_id": data["external_id"], "generation_ids": list(data["generation_ids"]),
                   "prompt": data.get("prompt", ""), "annotator": _annotator(client, users, a.completed_by),
                   "choice": None, "critique": "", "status": "skipped",
                   "created_at": _iso(a.created_at), "updated_at": updated}
            if not a.was_cancelled:
                try:
                    parsed = parse_result(kind, a.result, k)
                except InvalidResult as exc:
                    rejected.append({"annotation_id": a.id, "task_id": task.id, "project_id": ls_project_id,
                                     "reason": str(exc), "updated_at": updated})
                    continue
                row.update(choice=parsed.choice, critique=parsed.critique, status="submitted")
            rows.append(row)
    new_watermark = max((_iso(t.updated_at) for t in tasks), default=watermark)
    counts = store.commit(rows, rejected, deleted, new_watermark)
    return {**counts, "tasks_changed": len(tasks), "upserted": len(rows), "rejected": len(rejected),
            "watermark": new_watermark}


def _annotator(client, cache: dict[int, str], user_id) -> str:
    if user_id is None:
        return "unknown"
    if user_id not in cache:
        cache.update({u.id: u.email or u.username for u in client.users.list()})
    return cache.get(user_id, f"user-{user_id}")
