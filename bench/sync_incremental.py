"""Benchmark: incremental sync of a few new labels in a Label Studio project holding 10,000.

    .venv/bin/aligndiff up && .venv/bin/python bench/sync_incremental.py [--annotations 10000] [--new 10 100 1000]

In a scratch project on the running embedded services (its own Label Studio namespace):
imports ``--annotations`` binary tasks, each with one annotation (Label Studio's import
takes annotations inline, so building the project is fast), syncs them all once, then
submits ``--new`` annotations through the API like an annotator and times the
incremental sync after each batch. Appends the seconds of the full sync and of each
incremental one to bench/results/sync_incremental.jsonl.
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
from components.annotation.sync import OVERLAP, sync  # noqa: E402
from components.project import Project  # noqa: E402

RESULTS = REPO / "bench" / "results" / "sync_incremental.jsonl"


def scratch_project(root: Path) -> Project:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["services"]["state_dir"] = "state"
    params["services"]["label_studio"]["project_prefix"] = f"bench-sync-{int(time.time())}"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / ".env", root / ".env")
    project = Project.load(root)
    # the services' pid files and logs live in the repo's state dir; only the stores are scratch
    return project


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--annotations", type=int, default=10_000)
    ap.add_argument("--new", type=int, nargs="+", default=[10, 100, 1000],
                    help="new labels before each incremental sync (one sync per value)")
    args = ap.parse_args()
    project = scratch_project(REPO / ".aligndiff" / "bench" / "sync")
    client = studio.client_for(project)
    project_id = studio.ensure_project(client, project, "binary", 2)
    result = make_result("binary", "good")

    def task(i: int, labelled: bool) -> dict:
        data = {"prompt": f"prompt {i}", "external_id": f"bench-{i}", "generation_ids": [f"g{i}"],
                "image_0": "s3://none/none.png"}
        return {"data": data, **({"annotations": [{"result": result}]} if labelled else {})}

    # Label Studio imports annotations inline: the labelled project is built fast; the tasks
    # labelled "later" come without
    tasks = [task(i, i < args.annotations) for i in range(args.annotations + sum(args.new))]
    start = time.perf_counter()
    ids = []
    for chunk in range(0, len(tasks), 1000):
        response = client.projects.import_tasks(id=project_id, request=tasks[chunk:chunk + 1000],
                                                return_task_ids=True)
        ids += list(response.task_ids or [])
    built = time.perf_counter() - start
    # A sync re-reads what changed in the OVERLAP before its clock reading (late writers):
    # right after a bulk import, that is the whole import. Steady state is measured here.
    time.sleep(OVERLAP.total_seconds() + 5)

    start = time.perf_counter()
    first = sync(project, project_id, "binary", 2, client=client)
    row = {"annotations": args.annotations, "build_s": round(built, 1), "full_sync_s": round(time.perf_counter() - start, 2),
           "full_sync": first, "incremental": []}
    unlabelled = iter(ids[args.annotations:])
    for n in args.new:
        time.sleep(1.1)  # past the second of the last sync's clock reading
        for _ in range(n):
            client.annotations.create(id=next(unlabelled), result=result)
        start = time.perf_counter()
        counts = sync(project, project_id, "binary", 2, client=client)
        row["incremental"].append({"new": n, "seconds": round(time.perf_counter() - start, 2), "sync": counts})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as fh:
        fh.write(json.dumps(row, default=str) + "\n")
    print(json.dumps(row, default=str, indent=2))


if __name__ == "__main__":
    main()
