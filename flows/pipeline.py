"""Flows that run the DVC stage graph. Wiring only: the stages hold the logic."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from contextlib import chdir, contextmanager
from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)

from components.dvc_remote import dvc_env
from components.errors import UserError
from components.files import read_json
from components.locking import file_lock
from components.project import Project
from components.reports import headline_metrics, inline_images
from components.stage import ERRORS_ENV
from components.stage_graph import runnable_stages, stage_dependencies, stage_order


@contextmanager
def _dvc_repo(root: str):
    """The DVC repo at ``root``, held exclusively: concurrent runs queue here.

    DVC resolves paths against the working directory, so we work from the root.
    """
    from dvc.repo import Repo

    project = Project.load(root)
    os.environ.update(dvc_env(project))
    # DVC's INFO lines ("To track the changes with git, run: …") repeat after every stage, once
    # plain and once through Prefect's log; each stage task logs its own start and finish instead.
    logging.getLogger("dvc").setLevel(logging.WARNING)
    logger = get_run_logger()
    lock = file_lock(project.state_dir / "locks" / "dvc-repo.lock",
                     on_wait=lambda: logger.info("waiting for the DVC repo (another stage or run holds it)"))
    with lock, chdir(root), Repo(root) as repo:
        yield repo


GPU_LIMIT = "aligndiff-gpu"


@contextmanager
def gpu_slot(root: str, needed: bool | None = None):
    """One slot of the Prefect global concurrency limit ``aligndiff-gpu`` (schedules.gpu_slots)
    while GPU work runs, so overlapping flow runs queue for a GPU instead of sharing one
    until it runs out of memory. ``needed`` defaults to whether this machine has a GPU."""
    if needed is None:
        import torch

        needed = torch.cuda.is_available()
    if not needed:
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, Project.load(root).params.schedules.gpu_slots)
        except ObjectAlreadyExists:  # a concurrent run created it between read and create
            pass
    get_run_logger().info("waiting for a GPU slot (%s)", GPU_LIMIT)
    with concurrency(GPU_LIMIT, occupy=1, strict=True):
        yield


@task
def dvc_stage(root: str, stage: str) -> bool:
    """One stage of dvc.yaml (`dvc repro --single-item`) under the repo lock; True if it ran.
    A failing stage fails this task with the stage's own one-line reason."""
    from dvc.exceptions import DvcException, ReproductionError

    logger = get_run_logger()
    with _dvc_repo(root) as repo, gpu_slot(root), tempfile.NamedTemporaryFile("r", suffix=".log") as errors:
        os.environ[ERRORS_ENV] = errors.name  # the stage writes its one-line reasons here
        started = time.monotonic()
        logger.info(f"{stage}: started")
        try:
            ran = repo.reproduce(stage, single_item=True)
        except DvcException as exc:
            reasons = [line for line in errors.read().splitlines() if line.strip()]
            message = f"{exc}: {'; '.join(reasons)}" if reasons else _one_line(exc)
            if isinstance(exc, ReproductionError):  # DVC clears a stage's outputs before running it
                message += " (its previous outputs: `dvc checkout` restores them from the cache)"
            raise UserError(message) from None
        finally:
            os.environ.pop(ERRORS_ENV, None)
    logger.info(f"{stage}: done in {time.monotonic() - started:.1f} s" if ran else f"{stage}: skipped, up to date")
    return bool(ran)


def repro(root: str, targets: list[str] | None = None) -> list[str]:
    """`dvc repro` of ``targets`` (every stage if None), each stage its own task named after
    it and waiting for the stages it reads from, so the run's graph in the UI is the stage
    graph; returns the stages that ran. The first failing stage raises its reason."""
    graph = stage_dependencies(Path(root))
    order = stage_order(Path(root), targets)
    progress = create_progress_artifact(0.0, key="dvc-stages", description=f"stages done of {len(order)}")
    futures: dict = {}
    for stage in order:
        futures[stage] = dvc_stage.with_options(name=stage, task_run_name=stage).submit(
            root, stage, wait_for=[futures[up] for up in graph[stage] if up in futures])
    ran = []
    for done, stage in enumerate(order, start=1):
        if futures[stage].result():
            ran.append(stage)
        update_progress_artifact(progress, 100.0 * done / len(order))
    return ran


def _one_line(exc: BaseException) -> str:
    """DVC's message and its innermost cause ("failed to reproduce 'curate': <why>")."""
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    detail = str(cause).strip().splitlines()[-1] if cause is not exc and str(cause).strip() else ""
    return f"{exc}: {detail}" if detail else str(exc)


@task(name="dvc push", retries=3, retry_delay_seconds=[2, 10, 30])
def push(root: str, targets: list[str] | None = None) -> int:
    """Push the outputs of ``targets`` and the stages they depend on (all without targets):
    a fresh clone has no data for the stages it has not run yet, and pushing them would warn."""
    with _dvc_repo(root) as repo:
        return repo.push(targets=targets or None, with_deps=bool(targets))


@task(name="read metrics")
def read_metrics(root: str) -> dict[str, dict]:
    """Headline numbers the pipeline wrote (base model alignment, for now)."""
    return headline_metrics(Path(root))


@flow(name="reproduce", log_prints=True)
def reproduce(root: str = ".", targets: list[str] | None = None, push_outputs: bool = True) -> dict:
    """`dvc repro` (optionally of some targets), then push outputs to the DVC remote.

    Without targets: every stage whose inputs exist (the retrain stages wait for a label snapshot).
    """
    root = str(Path(root).resolve())
    skipped: dict[str, str] = {}
    if not targets:
        runnable, skipped = runnable_stages(Path(root))
        for stage, missing in skipped.items():
            print(f"skipping {stage}: {missing} does not exist yet")
        targets = runnable if skipped else None
    stages_run = repro(root, targets)
    pushed = push(root, targets) if push_outputs else 0
    metrics = read_metrics(root)
    lines = ["# dvc repro", f"- stages run: {', '.join(stages_run) or 'none (all up to date)'}",
             f"- files pushed to the DVC remote: {pushed}"]
    lines += [f"- skipped {stage}: `{missing}` does not exist yet" for stage, missing in skipped.items()]
    for name, values in metrics.items():
        lines += ["", f"## {name}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in values.items()]
    create_markdown_artifact(key="reproduce-summary", markdown="\n".join(lines),
                             description="What this reproduce run rebuilt, pushed and measured")
    metrics_table(metrics)
    return {"stages_run": stages_run, "skipped": skipped, "pushed": pushed, "metrics": metrics}


def metrics_table(metrics: dict[str, dict]) -> None:
    """The headline numbers as a table artifact on the run (sortable in the UI)."""
    if metrics:
        create_table_artifact(key="metrics", description="Headline metrics of this run",
                              table=[{"report": name, "metric": k, "value": v}
                                     for name, values in metrics.items() for k, v in values.items()])


# ---- sharded generation -------------------------------------------------------------

@task(name="dvc repro upstream")
def repro_upstream(root: str, target: str) -> list[str]:
    """Bring the stages ``target`` depends on up to date (not ``target`` itself)."""
    from dvc.exceptions import DvcException

    with _dvc_repo(root) as repo:
        upstream = [s.addressing for s in repo.stage.collect(target, with_deps=True) if s.addressing != target]
        try:
            return [stage.addressing for stage in repo.reproduce(targets=upstream)] if upstream else []
        except DvcException as exc:
            raise UserError(_one_line(exc)) from None


@task(name="generate shard", retries=1, task_run_name="generate shard {shard}")
def generate_shard(root: str, shard: str) -> str:
    """One prompt range, in its own process (its own threads, its own GPU if pinned)."""
    with gpu_slot(root):
        result = subprocess.run([sys.executable, "-m", "components.generate", "--shard", shard], cwd=root,
                                capture_output=True, text=True)
    if result.returncode:
        raise UserError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"shard {shard} failed")
    return result.stdout.strip().splitlines()[-1]


@flow(name="generate", log_prints=True)
def generate(root: str = ".", shards: int | None = None, push_outputs: bool = True) -> dict:
    """The generate stage, its prompt ranges made in parallel: one mapped task per shard
    (generate.shards; on a distributed task runner, one worker each), then `dvc repro
    generate` merges their records into the manifest and makes anything still missing."""
    root = str(Path(root).resolve())
    count = shards or Project.load(root).params.generate.shards
    upstream = repro_upstream(root, "generate")
    futures = generate_shard.map(unmapped(root), [f"{i}/{count}" for i in range(1, count + 1)])
    for summary in futures.result():
        print(summary)
    stages_run = repro(root, ["generate"])
    pushed = push(root, ["generate"]) if push_outputs else 0
    return {"shards": count, "stages_run": [*upstream, *stages_run], "pushed": pushed}


# ---- retrain ------------------------------------------------------------------------

RETRAIN_RECORD = ["dvc.lock", "params.yaml", "data/labels.dvc", "data/.gitignore", "models/.gitignore",
                  "models/production.json", "reports"]


@task(name="snapshot labels")
def snapshot_labels(root: str) -> dict:
    from components.annotation import rounds

    with file_lock(Project.load(root).state_dir / "locks" / "dvc-repo.lock"):
        return rounds.snapshot_labels(Project.load(root))


@task(name="promote")
def promote(root: str, build_commit: str | None) -> dict:
    from components import registry

    with file_lock(Project.load(root).state_dir / "locks" / "dvc-repo.lock"):
        card = registry.promote(Project.load(root), build_commit=build_commit)
    return {k: card[k] for k in ("version", "tag", "method", "model_version")}


@task(name="git commit")
def record(root: str, message: str, params_at_start: bytes) -> str | None:
    """Commit the run's record with the params.yaml the run started with: an edit made
    meanwhile is the user's next change, not this run's, so it stays uncommitted."""
    from components import gitops

    if (Path(root) / "params.yaml").read_bytes() != params_at_start:
        get_run_logger().warning("params.yaml changed during this run: the commit records the version the run "
                                 "started with; your edit is left uncommitted")
    with file_lock(Project.load(root).state_dir / "locks" / "dvc-repo.lock"):
        return gitops.commit(Project.load(root), RETRAIN_RECORD, message, as_of={"params.yaml": params_at_start})


@flow(name="retrain", log_prints=True)
def retrain(root: str = ".", force: bool = False, push_outputs: bool = True) -> dict:
    """Snapshot → validate → train_reward → finetune → evaluate → gate (DVC stages) → promote on pass.

    Runs only when ``retrain.min_new_labels`` annotations arrived since the last finished retrain
    (or ``force``). A validation failure stops it with the failed expectations.
    """
    from components.annotation import rounds

    root = str(Path(root).resolve())
    project = Project.load(root)
    new = rounds.new_labels(project)
    needed = project.params.retrain.min_new_labels
    if new < needed and not force:
        print(f"{new} new labels since the last finished retrain (< retrain.min_new_labels {needed}): nothing to do")
        return {"ran": False, "new_labels": new}
    params_at_start = (Path(root) / "params.yaml").read_bytes()
    labels = snapshot_labels(root)
    try:
        stages_run = repro(root, ["gate"])
    except UserError as exc:
        raise UserError(f"{exc}; production unchanged") from None
    decision = read_json(Path(root) / "reports" / "gate.json", "re-run `dvc repro gate`",
                         ("candidate", "passed", "failures"))
    commit = record(root, f"Retrain on {labels['annotations']} annotations: {', '.join(stages_run) or 'no change'}",
                    params_at_start)
    from components import registry

    promotable = decision["passed"] and project.params.retrain.promote and \
        not registry.is_production(project, decision["candidate"])
    promoted = promote(root, commit) if promotable else None
    pushed = push(root) if push_outputs else 0
    rounds.mark_retrained(project, labels["annotations"] + labels["stale"])
    metrics_table(headline_metrics(Path(root)))
    create_markdown_artifact(key="retrain-report", markdown=retrain_report(root, labels, decision, promoted),
                             description="Evaluation, gate decision and promotion of this retrain run")
    return {"ran": True, "new_labels": new, "labels": labels, "stages_run": stages_run, "gate": decision,
            "promoted": promoted, "commit": commit, "pushed": pushed}


def retrain_report(root: str, labels: dict, decision: dict, promoted: dict | None) -> str:
    reports = Path(root) / "reports"
    lines = ["# Retrain", "", f"- label snapshot: {labels['annotations']} annotations, {labels['preferences']} "
             f"preference pairs, agreement {labels['agreement_alpha']}"
             + (f"; {labels['stale']} annotations of earlier generations left out" if labels["stale"] else ""),
             f"- gate: {'PASS' if decision['passed'] else 'FAIL'}"]
    lines += [f"  - {line}" for line in decision["failures"]]
    lines.append(f"- promoted: {promoted['tag']}" if promoted else "- production unchanged")
    evaluation = reports / "evaluation.md"
    if evaluation.exists():
        lines += ["", inline_images(evaluation.read_text(), reports)]
    return "\n".join(lines)
