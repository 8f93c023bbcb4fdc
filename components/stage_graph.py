"""Which stages of dvc.yaml can run now.

The retrain stages depend on the label snapshot, an input no stage produces (humans
do, via ``aligndiff annotate snapshot``). Until it exists, reproducing "everything"
means every stage whose inputs exist or are produced by another runnable stage.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def _paths(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def runnable_stages(root: Path, unavailable: frozenset[str] = frozenset()) -> tuple[list[str], dict[str, str]]:
    """(stages that can run, {skipped stage: the missing input that blocks it}); inputs
    in ``unavailable`` count as missing (the demo labels a new round before retraining)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text()).get("stages", {})
    produced_by = {out: name for name, s in stages.items()
                   for out in _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots"))}
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
