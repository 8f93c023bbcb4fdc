"""DVC on the embedded S3, and Prefect flows reporting to the embedded server."""

from __future__ import annotations

import shutil
import sys

import pytest

from tests.conftest import run


def _dvc(project, *args):
    from components.dvc_remote import dvc_env

    return run([sys.executable, "-m", "dvc", *args], project.root, env=dvc_env(project))


def test_dvc_push_delete_cache_pull_round_trip(stack_project):
    root = stack_project.root
    config = (root / ".dvc" / "config").read_text()
    assert "s3://aligndiff-dvc/store" in config
    assert stack_project.credentials.s3_secret_key not in config  # secrets only in config.local

    data = root / "data" / "round-trip.bin"
    data.parent.mkdir(exist_ok=True)
    payload = bytes(range(256)) * 4096
    data.write_bytes(payload)
    _dvc(stack_project, "add", "data/round-trip.bin")
    _dvc(stack_project, "push")
    objects = list(stack_project.object_store(stack_project.params.services.s3.dvc_bucket).list("store/"))
    assert objects, "dvc push wrote nothing to the S3 remote"

    shutil.rmtree(root / ".dvc" / "cache")
    data.unlink()
    _dvc(stack_project, "pull")
    assert data.read_bytes() == payload
    status = _dvc(stack_project, "status", "-c")
    assert "in sync" in status.stdout


@pytest.fixture
def tiny_pipeline(stack_project):
    """A one-stage dvc.yaml in the session project."""
    root = stack_project.root
    (root / "dvc.yaml").write_text(
        "stages:\n"
        "  hello:\n"
        "    cmd: python -c \"open('hello.txt','w').write('hello from dvc')\"\n"
        "    outs: [hello.txt]\n"
    )
    yield root
    (root / "dvc.yaml").unlink()


def test_reproduce_flow_runs_stages_pushes_and_is_readable_through_the_api(tiny_pipeline, prefect_api):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.pipeline import reproduce

    state = reproduce(root=str(tiny_pipeline), return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert summary["stages_run"] == ["hello"] and summary["pushed"] >= 1
    assert (tiny_pipeline / "hello.txt").read_text() == "hello from dvc"

    def read_back(flow_run_id):
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all()  # the run's logs are sent in batches
        return asyncio.run(_read_back(flow_run_id))

    async def _read_back(flow_run_id):
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

        async with get_client() as client:
            run_ = await client.read_flow_run(flow_run_id)
            flow = await client.read_flow(run_.flow_id)
            artifacts = await client.read_artifacts()
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_.id])))
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_.id])))
            return run_, flow, artifacts, tasks, [entry.message for entry in logs]

    flow_run, flow, artifacts, tasks, _ = read_back(state.state_details.flow_run_id)
    assert flow.name == "reproduce"
    assert flow_run.state.is_completed()
    # each DVC stage is a task run of its own, named after the stage
    assert [t.name for t in tasks if not t.name.startswith(("dvc push", "read metrics"))] == ["hello"]
    summaries = [a for a in artifacts if a.key == "reproduce-summary" and a.flow_run_id == flow_run.id]
    assert summaries and "hello" in summaries[0].data

    second = reproduce(root=str(tiny_pipeline), return_state=True)
    assert second.result()["stages_run"] == []  # nothing changed: nothing rebuilt
    *_, logs = read_back(second.state_details.flow_run_id)
    assert "hello: skipped, up to date" in logs
    assert not any("To track the changes with git" in line for line in logs)  # DVC's hints stay out
