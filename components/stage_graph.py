"""The stage graph of dvc.yaml: which stage feeds which, in what order, which can run now.

The retrain stages depend on the label snapshot, an input no stage produces (humans
do, via ``aligndiff annotate snapshot``). Until it exists, reproducing "everything"
means every stage whose inputs exist or are produced by another runnable stage.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from components.errors import UserError


def _paths(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def _outputs(stage: dict) -> list[str]:
    return _paths(stage.get("outs")) + _paths(stage.get("metrics")) + _paths(stage.get("plots"))


def _feeds(out: str, dep: str) -> bool:
    return dep == out or dep.startswith(out.rstrip("/") + "/") or out.startswith(dep.rstrip("/") + "/")


def stage_dependencies(root: Path) -> dict[str, list[str]]:
    """{stage: the stages whose outputs it reads}, in dvc.yaml's order (DVC's own edges)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text()).get("stages", {})
    return {name: [other for other in stages if other != name and any(
                _feeds(out, dep) for out in _outputs(stages[other]) for dep in _paths(stage.get("deps")))]
            for name, stage in stages.items()}


def stage_order(root: Path, targets: list[str] | None = None) -> list[str]:
    """The stages ``targets`` need (every stage if None), each after the stages it reads from;
    otherwise in dvc.yaml's order."""
    graph = stage_dependencies(root)
    unknown = [t for t in targets or [] if t not in graph]
    if unknown:
        raise UserError(f"dvc.yaml: no stage {unknown[0]!r} (stages: {', '.join(graph)})")
    order: list[str] = []

    def visit(stage: str) -> None:
        if stage not in order:
            for upstream in graph[stage]:
                visit(upstream)
            order.append(stage)

    for stage in targets or graph:
        visit(stage)
    return order


def runnable_stages(root: Path, unavailable: frozenset[str] = frozenset()) -> tuple[list[str], dict[str, str]]:
    """(stages that can run, {skipped stage: the missing input that blocks it}); inputs
    in ``unavailable`` count as missing (the demo labels a new round before retraining)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text()).get("stages", {})
    produced_by = {out: name for name, s in stages.items() for out in _outputs(s)}
    skipped: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for name, stage in stages.items():
            if name in skipped:
                continue
            for dep in _paths(stage.get("deps")):
                producer = produced_by.get(dep)
                blocked = producer in skipped if producer else dep in unavailable or not (root / dep).exists()
                if blocked:
                    skipped[name] = skipped.get(producer, dep) if producer else dep
                    changed = True
                    break
    return [n for n in stages if n not in skipped], skipped
