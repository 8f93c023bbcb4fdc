"""Annotation rounds from the generations manifest: select, push, simulate, sync, snapshot.

Selection is random and seeded (active selection by reward-model disagreement comes
with the reward models). Pairwise tasks pair images of one prompt that share x_T, as
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


def push_round(project: Project, kind: RoundKind, k: int, limit: int | None, seed: int, on_progress=None) -> dict:
    manifest_path = project.path(MANIFEST_OUT)
    if not manifest_path.exists():
        raise UserError(f"{manifest_path}: no generations to label; run `dvc repro generate` first")
    specs = select(candidate_tasks(pd.read_parquet(manifest_path), kind, k), limit, seed)
    if not specs:
        raise UserError(f"{manifest_path}: no {kind} tasks can be formed (check generate.images_per_prompt "
                        "and generate.shared_noise_group)")
    client = studio.client_for(project)
    project_id = studio.ensure_project(client, project, kind, k)
    result = studio.push_tasks(client, project, project_id, specs, on_progress=on_progress)
    return {"project_id": project_id, "selected": len(specs), "created": result.created, "skipped": result.skipped,
            "selection": "random"}


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


def per_annotator(project: Project) -> dict[str, int]:
    annotations, _ = snap.load_stores(project.state_dir)
    return annotations["annotator"].value_counts().sort_index().to_dict() if len(annotations) else {}


def rejected_reasons(project: Project) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in sorted(Path(project.state_dir / "annotations").glob("*/rejected.parquet"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
