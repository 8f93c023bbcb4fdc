"""Deployments of the loop's flows on a process work pool, with the cron schedules of params.yaml.

Two equivalent ways in: ``aligndiff deploy`` registers them through Prefect's Python API,
and ``prefect deploy --all`` reads ``prefect.yaml``, which ``aligndiff deploy
--prefect-yaml`` renders from params.yaml (so the schedules have one source).
"""

from __future__ import annotations

import asyncio
import os

import yaml

from components.project import Project

ENTRYPOINTS = {
    "sync_annotations": "flows/loop.py:sync_annotations",
    "annotation_round": "flows/loop.py:annotation_round",
    "retrain": "flows/pipeline.py:retrain",
}


async def _ensure_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    async with get_client() as client:
        try:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            pass


PREFECT_YAML = "prefect.yaml"


def description(name: str, cron: str | None) -> str:
    return f"aligndiff {name} ({cron or 'on demand'})"


def prefect_yaml(project: Project) -> str:
    """prefect.yaml for ``prefect deploy --all``: the deployments ``deploy`` registers.

    Its flows take ``root: "."``: ``prefect deploy`` records the directory it ran in as
    the runs' working directory (its default pull step)."""
    schedules = project.params.schedules
    deployments = [{"name": name, "entrypoint": entrypoint, "description": description(name, getattr(schedules, name)),
                    "parameters": {"root": "."}, "work_pool": {"name": schedules.work_pool},
                    "schedules": [{"cron": cron}] if (cron := getattr(schedules, name)) else []}
                   for name, entrypoint in ENTRYPOINTS.items()]
    header = ("# Rendered from params.yaml (schedules:) by `aligndiff deploy --prefect-yaml`; edit params.yaml,\n"
              "# then re-render. `prefect deploy --all` registers these; `aligndiff deploy` does the same.\n")
    return header + yaml.safe_dump({"name": "aligndiff", "deployments": deployments},
                                   sort_keys=False)


def write_prefect_yaml(project: Project) -> str:
    path = project.path(PREFECT_YAML)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(prefect_yaml(project))
    os.replace(tmp, path)
    return str(path)


def deploy(project: Project) -> dict[str, str]:
    """Register (or update) the three deployments; returns name → deployment id."""
    from prefect import Flow

    schedules = project.params.schedules
    asyncio.run(_ensure_pool(schedules.work_pool))
    out = {}
    for name, entrypoint in ENTRYPOINTS.items():
        flow = Flow.from_source(source=str(project.root), entrypoint=entrypoint)
        cron = getattr(schedules, name)
        deployment_id = flow.deploy(name=name, work_pool_name=schedules.work_pool, cron=cron,
                                    parameters={"root": str(project.root)}, build=False, push=False,
                                    print_next_steps=False, ignore_warnings=True,
                                    description=description(name, cron))
        out[name] = str(deployment_id)
    return out
