"""Label Studio projects and round pushes, idempotent.

One project per round kind (binary, pairwise, best-of-k), found by title and
created or updated on demand. Images are not copied into Label Studio: tasks hold
``s3://bucket/key`` URIs and the project has an S3 import storage on our bucket with
presigning on, so Label Studio mints a fresh presigned URL whenever an annotator
opens a task — hours or weeks after the push.

Every task carries ``external_id`` = hash of its generation ids (in order), so
pushing the same selection twice creates nothing the second time. Creating a
project and pushing into one hold a lock (per title, per project) from reading what
exists to the last write, so two pushes at once cannot both create a project or a
task. The locks are files under the state directory: pushes from several machines
into one Label Studio must share that directory, or take turns.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from components.annotation.labeling import IMAGE_KEYS, RoundKind, label_config
from components.errors import ServiceError
from components.locking import file_lock
from components.project import Project


def client_for(project: Project):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=project.label_studio_url, api_key=project.credentials.ls_api_key, timeout=60)


def project_title(project: Project, kind: RoundKind, k: int) -> str:
    prefix = project.params.services.label_studio.project_prefix
    return f"{prefix}: {kind}" + (f" (k={k})" if kind == "best_of_k" else "")


def _lock(project: Project, what: str):
    digest = hashlib.sha256(f"{project.label_studio_url} {what}".encode()).hexdigest()[:16]
    return file_lock(project.state_dir / "locks" / f"label-studio-{digest}.lock")


def external_id(generation_ids: Sequence[str]) -> str:
    return hashlib.sha256("|".join(generation_ids).encode()).hexdigest()[:20]


def ensure_project(client, project: Project, kind: RoundKind, k: int = 2) -> int:
    """The Label Studio project for a round kind, with its labeling config and S3 storage."""
    title = project_title(project, kind, k)
    config = label_config(kind, k)
    with _lock(project, f"title {title}"):
        existing = sorted((p for p in client.projects.list() if p.title == title), key=lambda p: p.id)
        if existing:
            ls_project = existing[0]
            if ls_project.label_config != config:
                client.projects.update(id=ls_project.id, label_config=config)
        else:
            ls_project = client.projects.create(
                title=title, label_config=config,
                description="Created by aligndiff. Judge whether images match their prompt.")
        _ensure_storage(client, project, ls_project.id)
    return ls_project.id


def _ensure_storage(client, project: Project, project_id: int) -> None:
    s3 = project.params.services.s3
    storages = client.import_storage.s3.list(project=project_id)
    if any(st.bucket == s3.bucket for st in storages):
        return
    # Label Studio refuses a user-supplied loopback endpoint (SSRF guard) but trusts the
    # S3_ENDPOINT its operator set, which the embedded stack does: leave it blank then.
    endpoint = {} if s3.embedded else {"s3endpoint": project.s3_endpoint}
    # Never synced (that would turn every object into a task): it only resolves the
    # s3:// URIs of our tasks. No prefix, since Label Studio requires a prefix to be non-empty.
    client.import_storage.s3.create(
        project=project_id, title="aligndiff images", bucket=s3.bucket,
        region_name=s3.region, **endpoint,
        aws_access_key_id=project.credentials.s3_access_key,
        aws_secret_access_key=project.credentials.s3_secret_key,
        presign=True, presign_ttl=60, use_blob_urls=False, recursive_scan=True)


@dataclass(frozen=True)
class TaskSpec:
    prompt: str
    generation_ids: tuple[str, ...]
    image_keys: tuple[str, ...]


@dataclass(frozen=True)
class PushResult:
    project_id: int
    created: int
    skipped: int  # already in Label Studio, or repeated within the selection
    task_ids: dict[str, int]  # external id → Label Studio task id (new and existing)


def keyset_pages(client, ls_project_id: int, filters: list[dict], page_size: int, **list_options):
    """A project's tasks in id order, each page asking for ids above the last one read:
    unlike offset pages, a task created, edited or deleted meanwhile shifts no other
    task out of the page it was due in."""
    last_id = 0
    while True:
        items = [{"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": last_id}, *filters]
        query = json.dumps({"ordering": ["id"], "filters": {"conjunction": "and", "items": items}})
        # The pager's first page only: the next page is asked for by id, not by offset.
        page = client.tasks.list(project=ls_project_id, query=query, page_size=page_size, **list_options).items or []
        yield from page
        if len(page) < page_size:
            return
        last_id = page[-1].id


def existing_external_ids(client, project_id: int) -> dict[str, int]:
    out = {}
    for task in keyset_pages(client, project_id, [], 1000, fields="task_only"):
        ext = (task.data or {}).get("external_id")
        if ext:
            out[ext] = task.id
    return out


def push_tasks(client, project: Project, project_id: int, specs: Sequence[TaskSpec], chunk: int = 500,
               on_progress=None) -> PushResult:
    """Create one task per spec unless a task with its external id exists."""
    with _lock(project, f"project {project_id}"):
        return _push_locked(client, project, project_id, specs, chunk, on_progress)


def _push_locked(client, project: Project, project_id: int, specs: Sequence[TaskSpec], chunk: int,
                 on_progress) -> PushResult:
    bucket = project.params.services.s3.bucket
    have = existing_external_ids(client, project_id)
    new = []
    for spec in specs:
        if len(spec.image_keys) > len(IMAGE_KEYS) or len(spec.image_keys) != len(spec.generation_ids):
            raise ValueError(f"a task takes 1–{len(IMAGE_KEYS)} images, one per generation id")
        ext = external_id(spec.generation_ids)
        if ext in have:
            continue
        data = {"prompt": spec.prompt, "external_id": ext, "generation_ids": list(spec.generation_ids)}
        data.update({IMAGE_KEYS[i]: f"s3://{bucket}/{key}" for i, key in enumerate(spec.image_keys)})
        new.append(data)
    unique_new = list({d["external_id"]: d for d in new}.values())  # a selection may repeat itself
    created_ids: dict[str, int] = {}
    for start in range(0, len(unique_new), chunk):
        batch = unique_new[start:start + chunk]
        response = client.projects.import_tasks(id=project_id, request=batch, return_task_ids=True)
        ids = list(response.task_ids or [])
        if len(ids) != len(batch):
            raise ServiceError(f"Label Studio created {len(ids)} of {len(batch)} tasks in project {project_id}")
        created_ids.update({d["external_id"]: tid for d, tid in zip(batch, ids)})
        if on_progress:
            on_progress(len(batch))
    return PushResult(project_id=project_id, created=len(created_ids), skipped=len(specs) - len(unique_new),
                      task_ids={**have, **created_ids})
