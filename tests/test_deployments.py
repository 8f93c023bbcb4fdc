"""Deployments on the embedded Prefect server: registered with their schedules, and a
short schedule really creates runs that a process worker completes; GPU work queues for GPU slots."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from components.project import Project
from tests.conftest import REPO, sibling_project


def _every_minute(params: dict) -> None:
    params["schedules"].update(work_pool="test-pool", sync_annotations="* * * * *", annotation_round=None,
                               retrain="0 2 * * *")


@pytest.mark.slow
def test_deployments_are_registered_and_a_short_schedule_completes_runs(stack_project, prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.deploy import deploy

    root = sibling_project(stack_project, tmp_path / "scheduled", edit=_every_minute)
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    project = Project.load(root)
    ids = deploy(project)
    assert set(ids) == {"sync_annotations", "annotation_round", "retrain"}

    async def read(name: str):
        async with get_client() as client:
            deployment = await client.read_deployment(ids[name])
            runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[ids[name]])))
            return deployment, runs

    deployment, _ = asyncio.run(read("retrain"))
    assert deployment.work_pool_name == "test-pool" and deployment.parameters == {"root": str(root)}
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
    assert asyncio.run(read("annotation_round"))[0].schedules == []

    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_API_AUTH_STRING": project.credentials.prefect_auth,
           "PREFECT_HOME": str(project.state_dir / "prefect-worker")}
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "test-pool",
                               "--type", "process"], cwd=root, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, completed = time.monotonic() + 240, []
        while time.monotonic() < deadline and not completed:
            _, runs = asyncio.run(read("sync_annotations"))
            completed = [r for r in runs if r.state and r.state.is_completed()]
            failed = [r for r in runs if r.state and r.state.is_failed()]
            assert not failed, f"scheduled run failed: {failed[0].state.message}"
            time.sleep(3)
        assert completed, "no scheduled sync_annotations run completed within 4 minutes"
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a flow-run child can outlive SIGTERM: stop the group for good
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)

    async def task_runs(flow_run_id):
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    states = {t.name.split("-")[0]: t.state.type.value for t in asyncio.run(task_runs(completed[0].id))}
    assert states and set(states.values()) == {"COMPLETED"}


def _gpu_spans(root: Path, meet: threading.Barrier | None = None) -> list[tuple[float, float]]:
    """Two tasks of one flow run doing 'GPU work' at the same time; when each held the GPU.
    With ``meet``, each task waits there while holding its slot, so the run only finishes
    if both held a slot at once, however late the task runner starts the second."""
    from prefect import flow, task

    from flows.pipeline import gpu_slot

    spans = []

    @task
    def gpu_work(i: int) -> None:
        with gpu_slot(str(root), needed=True):
            start = time.monotonic()
            if meet is not None:
                meet.wait()
            time.sleep(2)
            spans.append((start, time.monotonic()))

    @flow
    def two_gpu_stages():
        gpu_work.map(range(2)).result()

    two_gpu_stages()
    return sorted(spans)


def test_gpu_work_queues_for_the_configured_gpu_slots(stack_project, prefect_api, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.pipeline import GPU_LIMIT

    root = sibling_project(stack_project, tmp_path / "one-gpu", lambda p: p["schedules"].update(gpu_slots=1))
    first, second = _gpu_spans(root)
    assert second[0] >= first[1], "two runs held the only GPU at once"
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
    assert limit.limit == 1 and limit.active_slots == 0  # released after use

    root = sibling_project(stack_project, tmp_path / "two-gpus", lambda p: p["schedules"].update(gpu_slots=2))
    # a BrokenBarrierError fails the flow: the two never held a slot at the same time
    first, second = _gpu_spans(root, meet=threading.Barrier(2, timeout=60))
    assert second[0] < first[1], "with two GPUs, two runs go at once"


def test_committed_prefect_yaml_is_the_one_params_yaml_renders():
    from flows.deploy import PREFECT_YAML, prefect_yaml

    assert (REPO / PREFECT_YAML).read_text() == prefect_yaml(Project.load(REPO)), \
        "prefect.yaml is stale: run `aligndiff deploy --prefect-yaml`"


def test_prefect_deploy_all_registers_the_scheduled_deployments(stack_project, prefect_api, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.deploy import _ensure_pool, write_prefect_yaml

    def schedules(params: dict) -> None:
        params["schedules"].update(work_pool="yaml-pool", annotation_round=None, retrain="30 1 * * *")

    root = sibling_project(stack_project, tmp_path / "from-yaml", edit=schedules)
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    project = Project.load(root)
    write_prefect_yaml(project)
    asyncio.run(_ensure_pool("yaml-pool"))
    subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=root, check=True,
                   env={**os.environ, "PREFECT_API_URL": prefect_api,
                        "PREFECT_API_AUTH_STRING": project.credentials.prefect_auth}, capture_output=True)

    async def read(name: str):
        async with get_client() as client:
            return await client.read_deployment_by_name(f"{name}/{name}")

    retrain = asyncio.run(read("retrain"))
    assert retrain.work_pool_name == "yaml-pool" and retrain.parameters == {"root": "."}
    assert [s.schedule.cron for s in retrain.schedules] == ["30 1 * * *"]
    assert retrain.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(root)}}]
    assert asyncio.run(read("annotation_round")).schedules == []
    assert [s.schedule.cron for s in asyncio.run(read("sync_annotations")).schedules] == ["*/10 * * * *"]
