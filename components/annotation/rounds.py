"""Annotation rounds from the generations manifest: select, push, simulate, sync, snapshot.

Selection is random and seeded, or active: the tasks the reward model's ensemble
disagrees on most (binary: spread of the heads' rewards; pairwise and best-of-k: spread
of the heads' reward differences between the task's images), where a human label
teaches the most. Pairwise tasks pair images of one prompt that share x_T, as
D3PO needs; best-of-k groups k images of one prompt; binary tasks are single images.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd

from components import models
from components.annotation import simulate as sim
from components.annotation import snapshot as snap
from components.annotation import studio
from components.annotation.labeling import RoundKind
from components.annotation.sync import sync
from components.errors import ServiceError, UserError
from components.files import read_json, read_parquet
from components.generate import MANIFEST_OUT
from components.project import Project


def candidate_tasks(manifest: pd.DataFrame, kind: RoundKind, k: int = 2) -> list[studio.TaskSpec]:
    rows = manifest.sort_values(["prompt_id", "noise_group", "generation_id"])
    specs = []
    if kind == "binary":
        for r in rows.itertuples():
            specs.append(studio.TaskSpec(r.prompt, (r.generation_id,), (r.image_key,)))
        return specs
    groups = rows.groupby(["prompt_id", "noise_group"] if kind == "pairwise" else ["prompt_id"], sort=True)
    size = 2 if kind == "pairwise" else k
    for _, group in groups:
        for start in range(0, len(group) - size + 1, size):
            chunk = group.iloc[start:start + size]
            specs.append(studio.TaskSpec(chunk["prompt"].iloc[0], tuple(chunk["generation_id"]), tuple(chunk["image_key"])))
    return specs


def select(specs: list[studio.TaskSpec], limit: int | None, seed: int) -> list[studio.TaskSpec]:
    if limit is None or limit >= len(specs):
        return specs
    order = np.random.default_rng(seed).permutation(len(specs))[:limit]
    return [specs[i] for i in sorted(order)]


def disagreement(specs: list[studio.TaskSpec], head_rewards: dict[str, np.ndarray]) -> np.ndarray:
    """Per task, how much the ensemble's heads disagree about it."""
    out = np.zeros(len(specs))
    for i, spec in enumerate(specs):
        r = np.stack([head_rewards[g] for g in spec.generation_ids])  # (images, heads)
        if len(r) == 1:
            out[i] = r[0].std()
        else:
            a, b = np.triu_indices(len(r), k=1)
            out[i] = (r[a] - r[b]).std(axis=1).mean()
    return out


def select_active(specs: list[studio.TaskSpec], limit: int | None, scores: np.ndarray, seed: int
                  ) -> list[studio.TaskSpec]:
    """``limit`` tasks by disagreement, spread over prompts, in manifest order.

    Greedy: each pick takes the task with the highest disagreement / (1 + tasks already
    picked for its prompt), so a few confusing prompts cannot take the whole round
    (the prompt-diversity term of BAL-PM); ties broken by a seeded draw.
    """
    if limit is None or limit >= len(specs):
        return specs
    tie_break = np.random.default_rng(seed).random(len(specs)) * 1e-9
    picked_per_prompt: dict[str, int] = {}
    available = np.ones(len(specs), bool)
    chosen = []
    for _ in range(limit):
        penalty = np.array([1 + picked_per_prompt.get(s.prompt, 0) for s in specs])
        value = np.where(available, scores / penalty + tie_break, -np.inf)
        best = int(np.argmax(value))
        chosen.append(best)
        available[best] = False
        picked_per_prompt[specs[best].prompt] = picked_per_prompt.get(specs[best].prompt, 0) + 1
    return [specs[i] for i in sorted(chosen)]


def ensemble_disagreement(project: Project, manifest: pd.DataFrame, specs: list[studio.TaskSpec]) -> np.ndarray:
    from components.feedback import Fetcher
    from components.models import quiet_model_io
    from components.reward.model import load_scorer

    quiet_model_io()  # a round's output is its own lines, not a bar per model load
    relative = "models/reward"
    path = project.path(relative)
    if not (path / "config.json").exists():
        raise UserError(f"{relative}: active selection needs a reward model; build one with `dvc repro train_reward` "
                        "or use --select random")
    scorer = load_scorer(project, path)
    if scorer.model.config.heads < 2:
        raise UserError(f"{relative}: a single-head reward model cannot disagree with itself; set reward.ensemble ≥ 2")
    ids = sorted({g for s in specs for g in s.generation_ids})
    rows = manifest.set_index("generation_id").loc[ids]
    rewards = scorer.head_rewards(Fetcher(project.object_store()).images(list(rows["image_key"])), list(rows["prompt"]))
    return disagreement(specs, dict(zip(ids, rewards)))


def _needs_label_studio(round_step):
    """An outage is one line (a ServiceError), not an HTTP client's traceback."""
    import httpx

    @functools.wraps(round_step)
    def step(project: Project, *args, **kwargs):
        try:
            return round_step(project, *args, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceError(f"Label Studio at {project.label_studio_url} is unreachable ({type(exc).__name__}); "
                               "is it running? (`aligndiff status`)") from None
    return step


def on_policy(project: Project, manifest: pd.DataFrame) -> pd.DataFrame:
    """The generations of production, the model the next fine-tune starts from: a round
    labels only those (the manifest also holds its predecessors', labelled before)."""
    current = models.version_of(project, "production")
    mine = manifest[manifest["model_version"] == current]
    if not len(mine):
        raise UserError(f"{MANIFEST_OUT}: no generations of production (model {current}) to label; "
                        "make them with `dvc repro generate`")
    return mine


@_needs_label_studio
def push_round(project: Project, kind: RoundKind, k: int, limit: int | None, seed: int, on_progress=None,
               selection: str = "auto") -> dict:
    manifest_path = project.path(MANIFEST_OUT)
    if not manifest_path.exists():
        raise UserError(f"{manifest_path}: no generations to label; run `dvc repro generate` first")
    manifest = on_policy(project, read_parquet(manifest_path, "rebuild it with `dvc repro generate`"))
    candidates = candidate_tasks(manifest, kind, k)
    if selection == "auto":
        selection = "disagreement" if (project.path("models/reward") / "config.json").exists() else "random"
    information = {}
    if selection == "disagreement":
        scores = ensemble_disagreement(project, manifest, candidates)
        specs = select_active(candidates, limit, scores, seed)
        chosen = np.array([scores[i] for i, s in enumerate(candidates) if s in set(specs)])
        # the ensemble's disagreement is the expected information of a label
        information = {"expected_information": round(float(chosen.mean()), 4) if len(chosen) else 0.0,
                       "random_expected_information": round(float(scores.mean()), 4) if len(scores) else 0.0}
    else:
        specs = select(candidates, limit, seed)
    if not specs:
        raise UserError(f"{manifest_path}: no {kind} tasks can be formed (check generate.images_per_prompt "
                        "and generate.shared_noise_group)")
    client = studio.client_for(project)
    project_id = studio.ensure_project(client, project, kind, k)
    result = studio.push_tasks(client, project, project_id, specs, on_progress=on_progress)
    summary = {"project_id": project_id, "kind": kind, "selected": len(specs), "created": result.created,
               "skipped": result.skipped, "selection": selection, **information,
               "prompts": len({s.prompt for s in specs})}
    write_summary(project, "push", kind, summary)
    return summary


def awaiting_labels(project: Project) -> tuple[int, int]:
    """How many of production's generations have no submitted label in the annotation
    stores yet, and how many it has."""
    manifest = on_policy(project, read_parquet(project.path(MANIFEST_OUT), "rebuild it with `dvc repro generate`",
                                               ["generation_id", "model_version"]))
    annotations, _ = snap.load_stores(project.state_dir)
    labelled = {g for ids in annotations["generation_ids"] for g in ids} if len(annotations) else set()
    mine = set(manifest["generation_id"])
    return len(mine - labelled), len(mine)


def grow_sample(project: Project) -> dict:
    """More of production's images for the next round, once every one it has is labelled.

    A model the gate did not replace keeps its images (they are a function of the model
    and the seeds), so an online round after it would offer the same ones again. This
    raises ``generate.images_per_prompt`` by ``generate.grow_by`` in params.yaml, as
    `dvc exp run -S` would, so the next `generate` draws new seeds while the labelled
    images keep theirs (and their labels), and the retrain that follows records the
    params it used. Nothing changes while some of production's images await labels.
    """
    import yaml

    from components.config import update_params

    awaiting, images = awaiting_labels(project)
    current = project.params.generate.images_per_prompt
    if awaiting:
        return {"grown": False, "awaiting_labels": awaiting, "images": images, "images_per_prompt": current}
    grown = current + project.params.generate.grow_by
    params_path = project.path("params.yaml")
    raw = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    # a GPU profile's own images_per_prompt is the one in effect: raise that one
    overlay = ((raw.get("profiles") or {}).get(project.params.profile) or {}).get("generate") or {}
    section = {"profiles": {project.params.profile: {"generate": {"images_per_prompt": grown}}}} \
        if "images_per_prompt" in overlay else {"generate": {"images_per_prompt": grown}}
    update_params(params_path, section)
    return {"grown": True, "awaiting_labels": 0, "images": images, "images_per_prompt": grown}


def write_summary(project: Project, action: str, kind: str, summary: dict) -> Path:
    """A short JSON record of a round step under ``<state>/rounds/`` (what was pushed or synced, when)."""
    import json
    import time

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = project.state_dir / "rounds" / f"{stamp}-{action}-{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"action": action, "kind": kind, "at": stamp, **summary}, indent=2, default=str) + "\n")
    return out


class NoProjectYet(UserError):
    """Nothing of this round kind was pushed to Label Studio yet (not an outage)."""


def project_id_for(client, project: Project, kind: RoundKind, k: int) -> int:
    title = studio.project_title(project, kind, k)
    ids = [p.id for p in client.projects.list() if p.title == title]
    if ids:
        return min(ids)  # the one ensure_project fills
    raise NoProjectYet(f"no Label Studio project {title!r} yet; run `aligndiff annotate push --kind {kind}` first")


@_needs_label_studio
def simulate_round(project: Project, kind: RoundKind, k: int, config: sim.AnnotatorConfig, on_progress=None) -> dict:
    client = studio.client_for(project)
    return sim.simulate(project, project_id_for(client, project, kind, k), kind, config, k, client=client,
                        on_progress=on_progress)


@_needs_label_studio
def sync_round(project: Project, kind: RoundKind, k: int, on_progress=None, full: bool = False) -> dict:
    """Sync (incremental, or ``full`` and verified), recorded with agreement, per-annotator
    counts and rejected results."""
    client = studio.client_for(project)
    result = sync(project, project_id_for(client, project, kind, k), kind, k, client=client, on_progress=on_progress,
                  full=full)
    annotations, _ = snap.load_stores(project.state_dir)
    of_kind = annotations[annotations.apply(snap.kind_of, axis=1) == kind] if len(annotations) else annotations
    rejected = rejected_reasons(project)
    write_summary(project, "sync", kind, {
        **result, "agreement_alpha": snap.krippendorff_alpha(of_kind) if len(of_kind) else None,
        "per_annotator": per_annotator(project),
        "rejected": [{"task_id": r.task_id, "reason": r.reason} for r in rejected.tail(50).itertuples()]
        if len(rejected) else []})
    return result


def snapshot_labels(project: Project) -> dict:
    """Freeze the stores into data/labels, versioned by DVC (the retrain pipeline's input)."""
    from components.dvc_remote import track

    manifest = project.path(MANIFEST_OUT)
    if not manifest.exists():
        raise UserError(f"{manifest}: no generations to pair the labels with; run `dvc repro generate` first")
    current = set(read_parquet(manifest, "rebuild it with `dvc repro generate`", ["generation_id"])["generation_id"])
    report = snap.snapshot(project.state_dir, project.path(snap.LABELS_DIR), project.path(snap.REPORT_OUT), current)
    track(project, snap.LABELS_DIR)
    return report


RETRAINED_MARK = "retrained.json"


def new_labels(project: Project) -> int:
    """Submitted annotations in the stores beyond those the last finished retrain used."""
    annotations, _ = snap.load_stores(project.state_dir)
    mark = project.state_dir / RETRAINED_MARK
    before = read_json(mark, "delete it: the next retrain counts every stored label as new",
                       ("annotations",))["annotations"] if mark.exists() else 0
    return max(0, len(annotations) - before)


def mark_retrained(project: Project, annotations: int) -> None:
    """Record that a retrain finished on this many annotations (a failed one leaves the mark alone)."""
    import json

    mark = project.state_dir / RETRAINED_MARK
    tmp = mark.with_suffix(".tmp")
    tmp.write_text(json.dumps({"annotations": annotations}) + "\n")
    tmp.replace(mark)


def per_annotator(project: Project) -> dict[str, int]:
    annotations, _ = snap.load_stores(project.state_dir)
    return annotations["annotator"].value_counts().sort_index().to_dict() if len(annotations) else {}


def rejected_reasons(project: Project) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in sorted(Path(project.state_dir / "annotations").glob("*/rejected.parquet"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
