"""Sync: pull what changed in a Label Studio project into the local store, losing nothing.

Incremental by default: only tasks whose ``updated_at`` is past the store's watermark
are read, so a sync costs what changed, not the size of the project. Three rules make
that safe while annotators keep working:

- **Keyset pages.** Tasks are read in id order, each page asking for ids above the
  last one read, so a task edited, created or deleted mid-read never shifts another
  out of the page it was due in (offset pages did: that lost edits).
- **The watermark is a time on the server's clock taken before the first read**, less
  an overlap for requests still being committed — never the newest ``updated_at``
  seen. A change made while a sync reads is therefore read again by the next one.
  Re-reading is harmless: rows are keyed by annotation id and the newest version wins.
- **Reconciliation by id.** The store remembers the project's task ids. When Label
  Studio's task count differs from those plus the tasks just read, something was
  deleted: the sync lists the task ids (ids only) and marks the annotations of deleted
  tasks deleted. (A deletion masked by a task created after the read shows in the next
  sync's count.) An annotation edited into a result
  that does not match the labeling config is marked ``rejected``, withdrawing its
  earlier label. ``full=True`` reads every task, whatever its ``updated_at`` — it also
  catches a change Label Studio stored without touching the task's ``updated_at``
  (seen when it answered HTTP 500) — and :func:`verify` then proves store == Label Studio.

Results that do not match the labeling config (Label Studio stores them anyway) are
recorded with a reason while the sync goes on. Concurrent syncs of one store
serialise on a lock.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
import httpx
import pandas as pd

from components.annotation.labeling import InvalidResult, RoundKind, parse_result
from components.annotation.store import AnnotationStore, latest_versions
from components.annotation.studio import keyset_pages
from components.errors import ServiceError
from components.locking import file_lock
from components.project import Project

# How long after its timestamp a change may still be uncommitted (a slow request): the
# watermark stays this far behind the server's clock, so such a change is read next time.
OVERLAP = timedelta(seconds=30)
PAGE_SIZE = 100


def store_for(project: Project, ls_project_id: int) -> AnnotationStore:
    return AnnotationStore(project.state_dir / "annotations" / str(ls_project_id))


def _iso(value) -> str:
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.astimezone(timezone.utc).isoformat(timespec="microseconds")


def server_now(client) -> datetime | None:
    """Label Studio's clock (its HTTP ``Date`` header, whole seconds rounded down)."""
    response = client.users.with_raw_response.whoami()
    date = response.headers.get("date")
    return parsedate_to_datetime(date).astimezone(timezone.utc) if date else None


def changed_tasks(client, ls_project_id: int, since: str | None, page_size: int | None = None) -> list:
    """Every task (with its annotations) updated after ``since``; all of them if None.
    ``page_size``: tasks per request (default ``PAGE_SIZE``)."""
    filters = []
    if since:
        value = datetime.fromisoformat(since).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # Label Studio's format
        filters.append({"filter": "filter:tasks:updated_at", "operator": "greater", "type": "Datetime",
                        "value": value})
    return list(keyset_pages(client, ls_project_id, filters, page_size or PAGE_SIZE, fields="all"))


def task_ids(client, ls_project_id: int, page_size: int = 1000) -> set[int]:
    """The ids of every task in the project (ids alone: ≈ 0.6 s per 1,000 tasks)."""
    return {t.id for t in keyset_pages(client, ls_project_id, [], page_size, include="id")}


def _live_tasks(client, ls_project_id: int, known: set[int] | None, read: set[int]) -> set[int]:
    """The project's task ids; listed only when the count says some are gone (or unknown)."""
    expected = (known or set()) | read
    if known is not None and client.projects.get(id=ls_project_id).task_number == len(expected):
        return expected
    return task_ids(client, ls_project_id)


def task_annotations(client, task) -> list:
    """The task's annotations, as listed in its page; asked for separately only if absent."""
    from label_studio_sdk.types import Annotation

    inline = getattr(task, "annotations", None)
    if inline is None:
        return list(client.annotations.list(id=task.id))
    return [a if isinstance(a, Annotation) else Annotation.model_validate(a) for a in inline]


class _Reader:
    """Turns Label Studio tasks into store rows (one per annotation) and rejections."""

    def __init__(self, client, ls_project_id: int, kind: RoundKind, k: int):
        self.client, self.ls_project_id, self.kind, self.k = client, ls_project_id, kind, k
        self.users: dict[int, str] = {}

    def rows(self, task, annotations) -> tuple[list[dict], list[dict]]:
        data = task.data or {}
        rows, rejected = [], []
        for a in annotations:
            updated = _iso(a.updated_at or a.created_at)
            reject = {"annotation_id": a.id, "task_id": task.id, "project_id": self.ls_project_id,
                      "updated_at": updated}
            if not data.get("external_id") or not data.get("generation_ids"):
                rejected.append({**reject,
                                 "reason": "task was not pushed by aligndiff (no external_id/generation_ids)"})
                continue
            row = {"annotation_id": a.id, "task_id": task.id, "project_id": self.ls_project_id,
                   "external_id": data["external_id"], "generation_ids": list(data["generation_ids"]),
                   "prompt": data.get("prompt", ""), "annotator": self._annotator(a.completed_by),
                   "choice": None, "critique": "", "status": "skipped",
                   "created_at": _iso(a.created_at), "updated_at": updated}
            if not a.was_cancelled:
                try:
                    parsed = parse_result(self.kind, a.result, self.k)
                    row.update(choice=parsed.choice, critique=parsed.critique, status="submitted")
                except InvalidResult as exc:
                    rejected.append({**reject, "reason": str(exc)})
                    row["status"] = "rejected"  # withdraws whatever this annotation said before
            rows.append(row)
        return rows, rejected

    def _annotator(self, user_id) -> str:
        if user_id is None:
            return "unknown"
        if user_id not in self.users:
            self.users.update({u.id: u.email or u.username for u in self.client.users.list()})
        return self.users.get(user_id, f"user-{user_id}")


def sync(project: Project, ls_project_id: int, kind: RoundKind, k: int = 2, client=None, on_progress=None,
         full: bool = False) -> dict:
    """Bring the store up to date with the project; returns counts for the round summary.

    ``full``: read every task, not only the changed ones, and verify store == Label Studio
    afterwards (the result's ``verified``). ``on_progress(done, total)`` as each task is read."""
    from components.annotation.studio import client_for

    client = client or client_for(project)
    store = store_for(project, ls_project_id)
    store.root.mkdir(parents=True, exist_ok=True)
    with file_lock(store.lock_path):
        try:
            result = _sync_locked(client, store, ls_project_id, kind, k, full, on_progress)
            if full:
                result["verified"] = verify(client, store, ls_project_id, kind, k)
            return result
        except (httpx.TransportError, OSError) as exc:
            raise ServiceError(f"Label Studio at {project.label_studio_url} became unreachable during sync "
                               f"({type(exc).__name__}); nothing was stored, run the sync again") from None


def _sync_locked(client, store: AnnotationStore, ls_project_id: int, kind: RoundKind, k: int, full: bool,
                 on_progress=None) -> dict:
    watermark = store.watermark()
    started = server_now(client)  # before the first read: the next sync reads from here
    tasks = changed_tasks(client, ls_project_id, None if full else watermark)
    known = store.annotations()
    read_tasks = {t.id for t in tasks}
    live_tasks = read_tasks if full else _live_tasks(client, ls_project_id, store.task_ids(), read_tasks)
    reader = _Reader(client, ls_project_id, kind, k)
    rows, rejected, present = [], [], set()
    for done, task in enumerate(tasks, start=1):
        if on_progress:
            on_progress(done, len(tasks))
        annotations = task_annotations(client, task)
        present |= {a.id for a in annotations}
        task_rows, task_rejected = reader.rows(task, annotations)
        rows += task_rows
        rejected += task_rejected
    # Gone: annotations of a task that was read without them, or of a task that no longer exists
    # (with full, every live task was read, so this covers every stored annotation).
    vanished = known["task_id"].isin(read_tasks) | ~known["task_id"].isin(live_tasks)
    deleted = [int(i) for i in known.loc[vanished, "annotation_id"] if int(i) not in present]
    new_watermark = _iso(started - OVERLAP) if started else watermark
    counts = store.commit(rows, rejected, deleted, new_watermark, live_tasks)
    return {**counts, "tasks_changed": len(tasks), "upserted": len(rows), "rejected": len(rejected),
            "watermark": new_watermark}


def verify(client, store: AnnotationStore, ls_project_id: int, kind: RoundKind, k: int) -> dict:
    """Compare the store with a fresh read of every task: ``equal`` when every annotation
    Label Studio holds is stored once, in its current version, and nothing else is live."""
    reader = _Reader(client, ls_project_id, kind, k)
    expected = []
    for task in changed_tasks(client, ls_project_id, None):
        expected += reader.rows(task, task_annotations(client, task))[0]
    stored = store.annotations()
    duplicated = int(stored["annotation_id"].duplicated().sum())
    live = latest_versions(stored)
    live = live[live["status"] != "deleted"].set_index("annotation_id")
    truth = pd.DataFrame(expected, columns=list(stored.columns)).set_index("annotation_id")
    missing = truth.index.difference(live.index)
    extra = live.index.difference(truth.index)
    both = truth.index.intersection(live.index)
    fields = ["status", "choice", "critique", "updated_at", "task_id"]
    differs = (truth.loc[both, fields].fillna("") != live.loc[both, fields].fillna("")).any(axis=1)
    return {"equal": not (len(missing) or len(extra) or differs.any() or duplicated),
            "label_studio": int(len(truth)), "missing": int(len(missing)), "extra": int(len(extra)),
            "outdated": int(differs.sum()), "duplicated": duplicated}
