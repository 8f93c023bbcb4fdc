"""Model registry: promotion of a gated candidate, the production pointer, model cards.

- ``models/registry/vN/``: every promoted version as it was trained — a LoRA adapter
  with ``candidate.json`` naming the version it applies to (``../vN-1``, or the base),
  or a whole pipeline — plus ``model_card.md`` and ``card.json``;
- ``models/production/``: the current version as one fused diffusers pipeline (fast to
  load, what ``--model production`` and the next fine-tune start from);
- ``models/production.json``: the pointer (``"model": "base"`` until the first promotion);
- ``models/registry.json``: every version with its tag, path and headline metrics.

In a git checkout the promotion is a commit (registry and production versioned with
DVC, pointer and index in git), and ``policy@vN`` tags the commit the model was *built*
from — its dvc.lock, labels and code — so
``git checkout policy@vN && dvc pull && dvc repro`` rebuilds it bit for bit.

A candidate the gate did not pass is never promoted; the gate's reasons are the error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from components import models
from components.errors import UserError
from components.evaluate import CANDIDATE, METRICS_OUT
from components.files import read_json
from components.gate import DECISION_OUT
from components.project import Project

PRODUCTION_DIR = Path("models/production")
REGISTRY_DIR = Path("models/registry")
REGISTRY = models.REGISTRY
TAG_PREFIX = models.TAG_PREFIX


def _hash_paths(project: Project, relative: list[str]) -> str | None:
    digest, found = hashlib.sha256(), False
    for rel in relative:
        path = project.path(rel)
        for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
            digest.update(str(f.relative_to(project.root)).encode())
            digest.update(f.read_bytes())
            found = True
    return digest.hexdigest()[:16] if found else None


def _git(project: Project, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=project.root, capture_output=True, text=True)


def is_production(project: Project, model_version: str) -> bool:
    """Whether this model version is already production (promoting it again would add nothing)."""
    return models.production_pointer(project).get("model_version") == model_version


def versions(project: Project) -> list[dict]:
    return models.registered(project)


def model_card(card: dict) -> str:
    m = card["metrics"]
    judge = m.get("judge", {})
    lines = [f"# {card['tag']}", "",
             f"Fine-tuned with **{card['method']}** from `{card['base']}` (version `{card['base_version']}`).", "",
             "| | |", "|---|---|",
             f"| promoted | {card['promoted_at']} |",
             f"| code commit | {card['code_commit'] or 'not a git checkout'} |",
             f"| prompt set | {card['prompts_hash']} |",
             f"| label snapshot | {card['labels_hash']} |",
             f"| learned-reward win rate over the previous production | {m.get('reward', {}).get('win_rate', 'n/a')} |",
             f"| judge-aligned rate (eval prompts) | {judge.get('candidate', {}).get('all', {}).get('aligned', 'n/a')} "
             f"(was {judge.get('production', {}).get('all', {}).get('aligned', 'n/a')}) |",
             f"| diversity drop | {m['diversity']['drop']} |",
             f"| near-copy rate | {m['memorization']['near_copy_rate']} |",
             f"| gate | passed: {', '.join(card['gate']['checked'])} |", "",
             "## Fine-tuning parameters", "", "```json", json.dumps(card["finetune_params"], indent=2), "```", "",
             f"Sample it: `aligndiff sample --model {card['tag']} ...`. When it is a LoRA adapter, "
             f"`pipe.load_lora_weights(\"models/registry/{card['version']}\")` applies it to the model its "
             "candidate.json names.", ""]
    return "\n".join(lines)


def promote(project: Project, force: bool = False, commit: bool = True, build_commit: str | None = None) -> dict:
    """Register the gated candidate as the next version and make it production.

    ``build_commit``: the commit the candidate was built from (default: HEAD), which
    gets the ``policy@vN`` tag.
    """
    candidate_dir = project.path(CANDIDATE)
    if not models.is_model_dir(candidate_dir):
        raise UserError(f"{CANDIDATE}: no candidate model to promote; run `dvc repro finetune`")
    decision_path = project.path(DECISION_OUT)
    if not decision_path.exists():
        raise UserError(f"{DECISION_OUT}: no gate decision; run `dvc repro gate` first")
    decision = read_json(decision_path, "re-run `dvc repro gate`", ("candidate", "passed", "failures"))
    version = models.model_version(candidate_dir)
    if decision["candidate"] != version:
        raise UserError(f"{DECISION_OUT}: the gate judged candidate {decision['candidate']}, but {CANDIDATE} is "
                        f"{version}; re-run `dvc repro gate`")
    if not decision["passed"] and not force:
        raise UserError("the gate did not pass; production stays:\n" + "\n".join(decision["failures"]))

    existing = versions(project)
    number = len(existing) + 1
    tag = f"{TAG_PREFIX}{number}"
    described = json.loads((candidate_dir / "candidate.json").read_text())
    head = _git(project, "rev-parse", "HEAD")
    build_commit = build_commit or (head.stdout.strip() if head.returncode == 0 else None)
    card = {
        "version": f"v{number}", "tag": tag, "model_version": version, "method": described.get("method"),
        "base": described.get("base"), "base_version": described.get("base_version"),
        "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "code_commit": build_commit,
        "prompts_hash": _hash_paths(project, ["data/prompts.parquet"]),
        "labels_hash": _hash_paths(project, ["data/labels"]),
        "finetune_params": project.params.finetune.model_dump(), "metrics": json.loads(
            project.path(METRICS_OUT).read_text()), "gate": decision, "forced": force and not decision["passed"],
    }
    version_dir = REGISTRY_DIR / card["version"]
    _write_atomically(project.path(version_dir), lambda tmp: _register(project, candidate_dir, tmp, existing, card))
    _write_atomically(project.path(PRODUCTION_DIR), lambda tmp: _fuse(project.path(version_dir), tmp))

    entry = {k: card[k] for k in ("version", "tag", "model_version", "method", "promoted_at", "code_commit")}
    entry["path"] = str(version_dir)
    entry["win_rate"] = card["metrics"].get("reward", {}).get("win_rate")
    entry["judge_aligned"] = card["metrics"].get("judge", {}).get("candidate", {}).get("all", {}).get("aligned")
    project.path(REGISTRY).write_text(json.dumps({"versions": [*existing, entry]}, indent=2) + "\n")
    project.path(models.PRODUCTION_POINTER).write_text(json.dumps(
        {"version": card["version"], "tag": tag, "model": str(PRODUCTION_DIR), "model_version": version},
        indent=2) + "\n")
    if commit and (project.root / ".git").exists():
        _record_in_git(project, tag, build_commit)
    return card


def _write_atomically(out: Path, write) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _register(project: Project, candidate_dir: Path, out: Path, existing: list[dict], card: dict) -> None:
    """The candidate as trained; a LoRA's base is re-pointed from production to the version it was."""
    for item in candidate_dir.iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy)(item, out / item.name)
    described = json.loads((candidate_dir / "candidate.json").read_text())
    if described.get("lora") and "@" not in described["base"]:
        base = (candidate_dir / described["base"]).resolve()
        if base == project.path(PRODUCTION_DIR).resolve() and existing:
            base = project.path(existing[-1]["path"]).resolve()
        described["base"] = os.path.relpath(base, project.path(REGISTRY_DIR / card["version"]))
        (out / "candidate.json").write_text(json.dumps(described, indent=2, sort_keys=True) + "\n")
    (out / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    (out / "model_card.md").write_text(model_card(card))


def _fuse(version_dir: Path, out: Path) -> None:
    models.load_pipeline(version_dir).save_pretrained(out)
    shutil.copy(version_dir / "model_card.md", out / "model_card.md")
    shutil.copy(version_dir / "card.json", out / "card.json")


def _record_in_git(project: Project, tag: str, build_commit: str | None) -> None:
    from components import gitops
    from components.dvc_remote import track

    track(project, REGISTRY_DIR)
    track(project, PRODUCTION_DIR)
    gitops.commit(project, [f"{REGISTRY_DIR}.dvc", f"{PRODUCTION_DIR}.dvc", str(models.PRODUCTION_POINTER),
                            str(REGISTRY), "models/.gitignore"], f"Promote {tag}")
    tagged = _git(project, "tag", tag, *([build_commit] if build_commit else []))
    if tagged.returncode != 0:
        raise UserError(f"git tag {tag} failed: {tagged.stderr.strip()}")


def listing(project: Project) -> list[dict]:
    current = models.production_pointer(project).get("version")
    return [{**v, "production": v["version"] == current} for v in versions(project)]
