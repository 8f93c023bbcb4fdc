"""Benchmark: incremental sync of a few new labels in a Label Studio project holding 10,000.

    .venv/bin/aligndiff up && .venv/bin/python bench/sync_incremental.py [--annotations 10000] [--new 10]

In a scratch project on the running embedded services (its own Label Studio namespace):
imports ``--annotations`` binary tasks, each with one annotation (Label Studio's import
takes annotations inline, so building the project is fast), syncs them all once, then
submits ``--new`` annotations through the API like an annotator and times the
incremental sync. Prints JSON: seconds for the full and the incremental sync.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components.annotation import studio  # noqa: E402
from components.annotation.labeling import make_result  # noqa: E402
from components.annotation.sync import sync  # noqa: E402
from components.project import Project  # noqa: E402


def scratch_project(root: Path) -> Project:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["services"]["state_dir"] = str(root / "state")
    params["services"]["label_studio"]["project_prefix"] = f"bench-sync-{int(time.time())}"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / ".env", root / ".env")
    project = Project.load(root)
    # the services' pid files and logs live in the repo's state dir; only the stores are scratch
    return project


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--annotations", type=int, default=10_000)
    ap.add_argument("--new", type=int, default=10)
    args = ap.parse_args()
    project = scratch_project(REPO / ".aligndiff" / "bench" / "sync")
    client = studio.client_for(project)
    project_id = studio.ensure_project(client, project, "binary", 2)
    result = make_result("binary", "good")
    tasks = [{"data": {"prompt": f"prompt {i}", "external_id": f"bench-{i}", "generation_ids": [f"g{i}"],
                       "image_0": "s3://none/none.png"},
              "annotations": [{"result": result}]} for i in range(args.annotations + args.new)]
    start = time.perf_counter()
    ids = []
    for chunk in range(0, len(tasks), 1000):
        response = client.projects.import_tasks(id=project_id, request=tasks[chunk:chunk + 1000],
                                                return_task_ids=True)
        ids += list(response.task_ids or [])
    built = time.perf_counter() - start
    # the last --new tasks lose their imported annotation, to be labelled "later"
    for task_id in ids[-args.new:]:
        for annotation in client.annotations.list(id=task_id):
            client.annotations.delete(id=annotation.id)

    start = time.perf_counter()
    first = sync(project, project_id, "binary", 2, client=client)
    full = time.perf_counter() - start
    time.sleep(1.1)  # the watermark has one-second resolution
    for task_id in ids[-args.new:]:
        client.annotations.create(id=task_id, result=result)
    start = time.perf_counter()
    second = sync(project, project_id, "binary", 2, client=client)
    incremental = time.perf_counter() - start
    print(json.dumps({"annotations": args.annotations, "new": args.new, "build_s": round(built, 1),
                      "full_sync_s": round(full, 2), "full_sync": first,
                      "incremental_sync_s": round(incremental, 2), "incremental_sync": second}, default=str))


if __name__ == "__main__":
    main()
