"""The feedback loop's flows besides retraining: annotation rounds, annotation sync, and
online rounds chaining them with retrain. Wiring only."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from components.errors import UserError
from components.project import Project
from flows.pipeline import repro

ROUND_KINDS = ("binary", "pairwise")


@task(name="push tasks", retries=3, retry_delay_seconds=[5, 30, 120])
def push(root: str, kind: str, limit: int | None, seed: int) -> dict:
    from components.annotation import rounds

    return rounds.push_round(Project.load(root), kind, 2, limit, seed)


@task(name="simulated annotators", retries=2, retry_delay_seconds=[10, 60])
def simulate(root: str, kind: str, flip_rate: float) -> dict:
    from components.annotation import rounds
    from components.annotation.simulate import AnnotatorConfig

    return rounds.simulate_round(Project.load(root), kind, 2, AnnotatorConfig(flip_rate=flip_rate))


@task(name="grow sample")
def grow(root: str) -> dict:
    from components.annotation import rounds

    return rounds.grow_sample(Project.load(root))


# One retry: the next scheduled sync comes within minutes, and a sync re-reads what it missed.
@task(name="sync", retries=1, retry_delay_seconds=30)
def sync(root: str, kind: str, full: bool = False) -> dict | None:
    from components.annotation import rounds

    try:
        return rounds.sync_round(Project.load(root), kind, 2, full=full)
    except rounds.NoProjectYet:  # nothing to sync; an outage, by contrast, fails (and retries) the task
        return None


@flow(name="annotation_round", log_prints=True)
def annotation_round(root: str = ".", kinds: list[str] = list(ROUND_KINDS), limit: int | None = None, seed: int = 0,
                     simulated: bool = False, flip_rate: float = 0.1, grow_sample: bool = True) -> dict:
    """curate → generate (DVC, when inputs changed) → select and push tasks for each kind;
    ``simulated``: the simulated annotators label them right away (demo, tests).

    When production's images are all labelled already (the gate kept it), ``grow_sample``
    raises generate.images_per_prompt by generate.grow_by in params.yaml and generates
    again, so the round labels new images of it instead of none."""
    root = str(Path(root).resolve())
    stages = repro(root, ["generate"])
    pushed = {kind: push(root, kind, limit, seed) for kind in kinds}
    if grow_sample and not any(p["created"] for p in pushed.values()):
        growth = grow(root)
        if growth["grown"]:
            print(f"every one of production's {growth['images']} images is labelled: "
                  f"generate.images_per_prompt raised to {growth['images_per_prompt']} (params.yaml)")
            stages += repro(root, ["generate"])
            pushed = {kind: push(root, kind, limit, seed) for kind in kinds}
        else:
            print(f"nothing new to push: {growth['awaiting_labels']} of production's {growth['images']} images "
                  "have no label yet")
    labelled = {kind: simulate(root, kind, flip_rate) for kind in kinds} if simulated else {}
    lines = ["# Annotation round", "", f"- stages run: {', '.join(stages) or 'none (all up to date)'}"]
    for kind, result in pushed.items():
        info = (f", expected information {result['expected_information']} (random: "
                f"{result['random_expected_information']})" if "expected_information" in result else "")
        lines.append(f"- {kind}: {result['created']} new tasks of {result['selected']} selected "
                     f"({result['selection']}{info})")
    for kind, result in labelled.items():
        lines.append(f"- {kind}: {result['annotators']} simulated annotators submitted {result['submitted']} labels")
    create_markdown_artifact(key="annotation-round", markdown="\n".join(lines), description="What this round pushed")
    return {"stages_run": stages, "pushed": pushed, "simulated": labelled}


@flow(name="sync_annotations", log_prints=True)
def sync_annotations(root: str = ".", full: bool = False) -> dict:
    """Pull every round kind's Label Studio project into the annotation stores: what changed,
    or (``full``) every task, then check that each store equals its project."""
    root = str(Path(root).resolve())
    results = {kind: sync(root, kind, full) for kind in ROUND_KINDS}
    for kind, result in results.items():
        print(f"{kind}: " + (f"{result['new']} new, {result['tasks_changed']} tasks read" if result
                             else "no project yet"))
    unequal = [f"{kind} ({r['verified']})" for kind, r in results.items() if r and full and not r["verified"]["equal"]]
    if unequal:
        raise UserError(f"after a full sync the store differs from Label Studio for {', '.join(unequal)}; "
                        "annotators may have edited during the check: run it again")
    return results


@flow(name="online_rounds", log_prints=True)
def online_rounds(root: str = ".", rounds: int = 1, kinds: list[str] = list(ROUND_KINDS), limit: int | None = None,
                  simulated: bool = False, flip_rate: float = 0.1, poll_minutes: float = 10.0,
                  max_wait_hours: float = 168.0) -> list[dict]:
    """Chained on-policy rounds, as the trajectory methods' papers iterate: each round labels
    images of production (the previous round's promotion), retrains from it, and what it
    promotes is the next round's model and reference. One run shows each round's
    annotation_round → sync_annotations → retrain.

    People label in Label Studio meanwhile: the round syncs every ``poll_minutes`` until
    retrain.min_new_labels labels arrived (at most ``max_wait_hours``); ``simulated``: the
    simulated annotators label at once. After a round that promotes nothing, the next
    labels more images of the same model (``annotation_round``'s ``grow_sample``). Stops
    when a round has nothing new to push.
    """
    from components.annotation import rounds as annotation
    from flows.pipeline import retrain

    root = str(Path(root).resolve())
    project = Project.load(root)
    results = []
    for number in range(1, rounds + 1):
        pushed = annotation_round(root, kinds=kinds, limit=limit, seed=number, simulated=simulated,
                                  flip_rate=flip_rate)
        if not any(p["created"] for p in pushed["pushed"].values()):
            print(f"round {number}: nothing new to label; stopping")
            break
        deadline = time.monotonic() + max_wait_hours * 3600
        sync_annotations(root)
        while annotation.new_labels(project) < project.params.retrain.min_new_labels and time.monotonic() < deadline:
            time.sleep(poll_minutes * 60)
            sync_annotations(root)
        result = retrain(root)
        results.append({"round": number, "pushed": {k: v["created"] for k, v in pushed["pushed"].items()},
                        "ran": result["ran"], "promoted": result.get("promoted")})
        print(f"round {number}: " + (f"promoted {result['promoted']['tag']}" if result.get("promoted")
                                     else "production unchanged; the next round labels more of its images"))
    return results
