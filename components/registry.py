"""Model registry: promotion of a gated candidate, the production pointer, model cards.

- ``models/production/``: the promoted model as a whole diffusers pipeline (a LoRA
  candidate is fused into its base; the adapter itself is kept under ``lora/`` for
  ``pipe.load_lora_weights``), with ``model_card.md`` and ``card.json`` next to the weights;
- ``models/production.json``: the pointer ``aligndiff sample --model production`` and the
  next fine-tune's ``finetune.init: production`` read;
- ``models/registry.json``: every promoted version with its metrics;
- in a git repository: ``models/production`` is versioned with DVC, and the pointer,
  registry and ``.dvc`` file are committed and tagged ``policy@vN`` — so
  ``git checkout policy@vN && dvc pull`` gives that model back, and ``dvc repro`` at the
  tag rebuilds it.

A candidate the gate did not pass is never promoted; the gate's reasons are the error.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

from components import models
from components.errors import UserError
from components.evaluate import CANDIDATE, METRICS_OUT
from components.gate import DECISION_OUT
from components.project import Project

PRODUCTION_DIR = Path("models/production")
REGISTRY = Path("models/registry.json")
TAG_PREFIX = "policy@v"


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


def versions(project: Project) -> list[dict]:
    path = project.path(REGISTRY)
    return json.loads(path.read_text())["versions"] if path.exists() else []


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
             "Load it: `WorldPipeline.from_pretrained(\"models/production\")` (world) or "
             "`DiffusionPipeline.from_pretrained(...)`; the adapter alone: `pipe.load_lora_weights(\"models/production/lora\")` "
             "on the base.", ""]
    return "\n".join(lines)


def promote(project: Project, force: bool = False, commit: bool = True) -> dict:
    candidate_dir = project.path(CANDIDATE)
    if not models.is_model_dir(candidate_dir):
        raise UserError(f"{CANDIDATE}: no candidate model to promote; run `dvc repro finetune`")
    decision_path = project.path(DECISION_OUT)
    if not decision_path.exists():
        raise UserError(f"{DECISION_OUT}: no gate decision; run `dvc repro gate` first")
    decision = json.loads(decision_path.read_text())
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
    card = {
        "version": f"v{number}", "tag": tag, "model_version": version, "method": described.get("method"),
        "base": described.get("base"), "base_version": described.get("base_version"),
        "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_commit": head.stdout.strip() if head.returncode == 0 else None,
        "prompts_hash": _hash_paths(project, ["data/prompts.parquet"]),
        "labels_hash": _hash_paths(project, ["data/labels"]),
        "finetune_params": project.params.finetune.model_dump(), "metrics": json.loads(
            project.path(METRICS_OUT).read_text()), "gate": decision, "forced": force and not decision["passed"],
    }

    out = project.path(PRODUCTION_DIR)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    models.load_pipeline(candidate_dir).save_pretrained(tmp)
    if (candidate_dir / "pytorch_lora_weights.safetensors").exists():
        (tmp / "lora").mkdir()
        shutil.copy(candidate_dir / "pytorch_lora_weights.safetensors", tmp / "lora")
    (tmp / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    (tmp / "model_card.md").write_text(model_card(card))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)

    entry = {k: card[k] for k in ("version", "tag", "model_version", "method", "promoted_at", "code_commit")}
    entry["win_rate"] = card["metrics"].get("reward", {}).get("win_rate")
    entry["judge_aligned"] = card["metrics"].get("judge", {}).get("candidate", {}).get("all", {}).get("aligned")
    project.path(REGISTRY).write_text(json.dumps({"versions": [*existing, entry]}, indent=2) + "\n")
    project.path(models.PRODUCTION_POINTER).write_text(json.dumps(
        {"version": card["version"], "tag": tag, "path": str(PRODUCTION_DIR), "model_version": version},
        indent=2) + "\n")
    if commit and (project.root / ".git").exists():
        _record_in_git(project, tag)
    return card


def _record_in_git(project: Project, tag: str) -> None:
    from components import gitops
    from components.dvc_remote import track

    track(project, PRODUCTION_DIR)
    gitops.commit(project, [str(PRODUCTION_DIR) + ".dvc", str(models.PRODUCTION_POINTER), str(REGISTRY),
                            "models/.gitignore"], f"Promote {tag}")
    tagged = _git(project, "tag", tag)
    if tagged.returncode != 0:
        raise UserError(f"git tag {tag} failed: {tagged.stderr.strip()}")


def listing(project: Project) -> list[dict]:
    pointer = project.path(models.PRODUCTION_POINTER)
    current = json.loads(pointer.read_text())["version"] if pointer.exists() else None
    return [{**v, "production": v["version"] == current} for v in versions(project)]
