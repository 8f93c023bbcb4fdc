"""Judge alignment of a world model: sample fixed seeds per composition, judge every image.

Used by the pre-training probes, the ``evaluate_base`` stage and the evaluation gate.
Also a stage: ``python -m components.world.alignment`` writes ``reports/base_metrics.json``
(per attribute, on compositions seen in pre-training and on held-out ones).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from components.sampling import SamplerConfig, derive_seed, sample
from components.world.grammar import ATTRIBUTES, Composition, all_compositions
from components.world.judge import judge

BASE_METRICS_OUT = Path("reports/base_metrics.json")


def split_compositions(holdout: list[str]) -> dict[str, list[Composition]]:
    comps = all_compositions()
    unseen = [c for c in comps if f"{c.count_word} {c.colour}" in holdout]
    return {"seen": [c for c in comps if c not in unseen], "unseen": unseen}


def evaluate(pipe, compositions: list[Composition], per_composition: int, seed: int, config: SamplerConfig,
             batch_size: int = 96, on_batch=None) -> dict:
    """Rates of aligned images and of each attribute being right, over fixed seeds."""
    jobs = [(c, k) for c in compositions for k in range(per_composition)]
    totals = dict.fromkeys(("aligned", *ATTRIBUTES), 0)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        out = sample(pipe, [c.prompt for c, _ in chunk],
                     [derive_seed(seed, f"eval:{c.prompt}:{k}") for c, k in chunk], config, record=False)
        for image, (c, _) in zip(out.images, chunk):
            verdict = judge(image, c)
            totals["aligned"] += verdict.aligned
            for attribute in ATTRIBUTES:
                totals[attribute] += getattr(verdict, attribute)
        if on_batch:
            on_batch(len(chunk))
    return {**{k: round(v / len(jobs), 4) for k, v in totals.items()}, "images": len(jobs)}


def evaluate_splits(pipe, holdout: list[str], per_composition: int, seed: int, config: SamplerConfig,
                    on_batch=None) -> dict:
    return {name: evaluate(pipe, comps, per_composition, seed, config, on_batch=on_batch)
            for name, comps in split_compositions(holdout).items()}


def _stage(project) -> str:
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from components import models
    from components.errors import UserError

    params = project.params
    if params.profile != "world":
        raise UserError("evaluate_base judges alignment with the world judge: world profile only")
    torch.set_num_threads(params.pretrain.threads)
    pipe = models.load_pipeline(models.resolve(project, "base"))
    per = params.evaluate_base.images_per_composition
    with Progress(TextColumn("evaluate base"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("eval", total=96 * per)
        metrics = evaluate_splits(pipe, params.world.holdout, per, params.seed,
                                  SamplerConfig.from_params(params.sample), on_batch=lambda n: bar.advance(task, n))
    out = project.path(BASE_METRICS_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    return (f"aligned {metrics['seen']['aligned']:.1%} on seen, "
            f"{metrics['unseen']['aligned']:.1%} on held-out compositions")


def main() -> int:
    from components.stage import run_stage

    return run_stage("evaluate_base", _stage)


if __name__ == "__main__":
    sys.exit(main())
