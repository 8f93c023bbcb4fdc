"""Annotation rounds from the generations manifest: select, push, simulate, sync, snapshot.

Selection is random and seeded, or active: the tasks the reward model's ensemble
disagrees on most (binary: spread of the heads' rewards; pairwise and best-of-k: spread
of the heads' reward differences between the task's images), where a human label
teaches the most. Pairwise tasks pair images of one prompt that share x_T, as
D3PO needs; best-of-k groups k images of one prompt; binary tasks are single images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from components.annotation import simulate as sim
from components.annotation import snapshot as snap
from components.annotation import studio
from components.annotation.labeling import RoundKind
from components.annotation.sync import sync
from components.errors import UserError
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
    """The ``limit`` tasks with the highest disagreement (seeded tie-break), in manifest order."""
    if limit is None or limit >= len(specs):
        return specs
    tie_break = np.random.default_rng(seed).random(len(specs))
    order = np.lexsort((tie_break, -scores))[:limit]
    return [specs[i] for i in sorted(order)]


def ensemble_disagreement(project: Project, manifest: pd.DataFrame, specs: list[studio.TaskSpec]) -> np.ndarray:
    from components.feedback import Fetcher
    from components.reward.model import RewardScorer

    relative = "models/reward"
    path = project.path(relative)
    if not (path / "config.json").exists():
        raise UserError(f"{relative}: active selection needs a reward model; build one with `dvc repro train_reward` "
                        "or use --select random")
    scorer = RewardScorer.load(path)
    if scorer.model.config.heads < 2:
        raise UserError(f"{relative}: a single-head reward model cannot disagree with itself; set reward.ensemble ≥ 2")
    ids = sorted({g for s in specs for g in s.generation_ids})
    rows = manifest.set_index("generation_id").loc[ids]
    rewards = scorer.head_rewards(Fetcher(project.object_store()).images(list(rows["image_key"])), list(rows["prompt"]))
    return disagreement(specs, dict(zip(ids, rewards)))


def push_round(project: Project, kind: RoundKind, k: int, limit: int | None, seed: int, on_progress=None,
               selection: str = "random") -> dict:
    manifest_path = project.path(MANIFEST_OUT)
    if not manifest_path.exists():
        raise UserError(f"{manifest_path}: no generations to label; run `dvc repro generate` first")
    manifest = pd.read_parquet(manifest_path)
    candidates = candidate_tasks(manifest, kind, k)
    if selection == "disagreement":
        specs = select_active(candidates, limit, ensemble_disagreement(project, manifest, candidates), seed)
    else:
        specs = select(candidates, limit, seed)
    if not specs:
        raise UserError(f"{manifest_path}: no {kind} tasks can be formed (check generate.images_per_prompt "
                        "and generate.shared_noise_group)")
    client = studio.client_for(project)
    project_id = studio.ensure_project(client, project, kind, k)
    result = studio.push_tasks(client, project, project_id, specs, on_progress=on_progress)
    return {"project_id": project_id, "selected": len(specs), "created": result.created, "skipped": result.skipped,
            "selection": selection}


def project_id_for(client, project: Project, kind: RoundKind, k: int) -> int:
    title = studio.project_title(project, kind, k)
    for p in client.projects.list():
        if p.title == title:
            return p.id
    raise UserError(f"no Label Studio project {title!r} yet; run `aligndiff annotate push --kind {kind}` first")


def simulate_round(project: Project, kind: RoundKind, k: int, config: sim.AnnotatorConfig, on_progress=None) -> dict:
    client = studio.client_for(project)
    return sim.simulate(project, project_id_for(client, project, kind, k), kind, config, k, client=client,
                        on_progress=on_progress)


def sync_round(project: Project, kind: RoundKind, k: int) -> dict:
    client = studio.client_for(project)
    return sync(project, project_id_for(client, project, kind, k), kind, k, client=client)


def snapshot_labels(project: Project) -> dict:
    """Freeze the stores into data/labels, versioned by DVC (the retrain pipeline's input)."""
    from components.dvc_remote import track

    report = snap.snapshot(project.state_dir, project.path(snap.LABELS_DIR), project.path(snap.REPORT_OUT))
    track(project, snap.LABELS_DIR)
    return report


def new_labels(project: Project) -> int:
    """Submitted annotations in the stores beyond those in the last label snapshot."""
    import json

    annotations, _ = snap.load_stores(project.state_dir)
    report = project.path(snap.REPORT_OUT)
    before = json.loads(report.read_text())["annotations"] if report.exists() else 0
    return max(0, len(annotations) - before)


def per_annotator(project: Project) -> dict[str, int]:
    annotations, _ = snap.load_stores(project.state_dir)
    return annotations["annotator"].value_counts().sort_index().to_dict() if len(annotations) else {}


def rejected_reasons(project: Project) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in sorted(Path(project.state_dir / "annotations").glob("*/rejected.parquet"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
