"""Round push against the real Label Studio and S3: idempotent tasks, images reachable later."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from components.annotation import studio
from components.generate import png_bytes


def _specs(store, n: int, seed: int = 0) -> list[studio.TaskSpec]:
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n):
        keys = tuple(store.put_bytes(png_bytes(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)), "images", ".png",
                                     content_type="image/png") for _ in range(2))
        specs.append(studio.TaskSpec(prompt=f"prompt {i}", generation_ids=(f"g{seed}-{i}a", f"g{seed}-{i}b"),
                                     image_keys=keys))
    return specs


def test_push_is_idempotent_and_images_resolve_through_label_studio(stack_project, tmp_path):
    from components.project import Project
    from tests.conftest import sibling_project

    project = Project.load(sibling_project(stack_project, tmp_path / "push"))  # own Label Studio namespace
    client = studio.client_for(project)
    project_id = studio.ensure_project(client, project, "pairwise")
    assert studio.ensure_project(client, project, "pairwise") == project_id  # found, not duplicated
    assert len(client.import_storage.s3.list(project=project_id)) == 1

    store = project.object_store()
    specs = _specs(store, 5)
    first = studio.push_tasks(client, project, project_id, specs + specs[:1])
    assert first.created == 5 and first.skipped == 1
    second = studio.push_tasks(client, project, project_id, specs + _specs(store, 2, seed=1))
    assert second.created == 2 and second.skipped == 5
    assert len(studio.existing_external_ids(client, project_id)) == 7

    # What an annotator's browser does: ask Label Studio for the image (logged in), get
    # redirected to a fresh presigned S3 URL, fetch that without Label Studio credentials.
    import requests

    task = client.tasks.get(id=first.task_ids[studio.external_id(specs[0].generation_ids)])
    resolved = client.tasks.get(id=task.id, request_options={"additional_query_parameters": {"resolve_uri": True}})
    url = resolved.data["image_0"]
    assert not url.startswith("s3://")
    if url.startswith("/"):
        url = project.label_studio_url + url
    hop = requests.get(url, headers={"Authorization": f"Token {project.credentials.ls_api_key}"},
                       allow_redirects=False, timeout=30)
    assert hop.status_code in (302, 303, 307) and "X-Amz-Signature=" in hop.headers["Location"]
    image = requests.get(hop.headers["Location"], timeout=30)
    assert image.status_code == 200
    assert Image.open(io.BytesIO(image.content)).size == (32, 32)
    assert image.content == store.get_bytes(specs[0].image_keys[0])
