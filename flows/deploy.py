"""Deployments of the loop's flows on a process work pool, with the cron schedules of params.yaml."""

from __future__ import annotations

import asyncio

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
                                    description=f"aligndiff {name} ({cron or 'on demand'})")
        out[name] = str(deployment_id)
    return out
