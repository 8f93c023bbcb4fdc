"""Benchmark: the share of a training stage's wall time spent logging (DVCLive curves, sample grids).

    .venv/bin/python bench/logging_overhead.py --stage finetune [--set finetune.method=d3po ...]

Stages: pretrain_vae, pretrain_clip, pretrain, train_reward, finetune. Needs the embedded
services (`aligndiff up`) for the stages that read images from S3, and the repo's models
and data (`dvc repro`). The stage runs in a scratch project next to the repo (the repo's
models linked, except the one the stage writes; its data copied), with every call into
the logging timed: the logger's rows, images and summary (``StageLogger``), the resumed
curves' check and the sample grids (sampling included). Pre-training's alignment probes
are measurements the stage made before DVCLive: reported apart, not counted as logging.
Target: logging under 2% of the stage. Appends to bench/results/logging_overhead.jsonl.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.learning_efficacy import params_with  # noqa: E402
from components import live  # noqa: E402
from components.project import Project  # noqa: E402

RESULTS = REPO / "bench" / "results" / "logging_overhead.jsonl"
WRITES = {"pretrain_vae": "vae", "pretrain_clip": "clip", "pretrain": "base", "train_reward": "reward",
          "finetune": "candidate"}


def run_stage(stage: str, project: Project) -> None:
    if stage == "finetune":
        from components.finetune.stage import finetune

        finetune(project)
    elif stage == "train_reward":
        from components.reward.train import train_reward

        train_reward(project.params, project.root, project.object_store())
    else:
        module = importlib.import_module(f"components.world.{stage}")
        getattr(module, stage)(project.params, project.root, project.state_dir)


def scratch_project(root: Path, stage: str, overrides: list[str]) -> Project:
    shutil.rmtree(root, ignore_errors=True)
    (root / "models").mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params_with(overrides), sort_keys=False))
    shutil.copy(REPO / ".env", root / ".env")
    (root / ".aligndiff").symlink_to(REPO / ".aligndiff")  # the running services' credentials and ports
    for model in REPO.joinpath("models").iterdir():
        if model.name != WRITES[stage]:
            (root / "models" / model.name).symlink_to(model)
    shutil.copytree(REPO / "data", root / "data")
    return Project.load(root)


def time_calls(spent: dict, bucket: str, cls, name: str) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[bucket] += time.perf_counter() - start

    setattr(cls, name, timed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=sorted(WRITES), default="finetune")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    project = scratch_project(REPO.parent / "scratch-logging", args.stage, args.set)
    spent: dict[str, float] = defaultdict(float)
    for name in ("log_at", "finalize"):  # the grids call log_image: counted with them
        time_calls(spent, "curves", live.StageLogger, name)
    time_calls(spent, "grids", live.SampleGrids, "on_train_batch_end")
    time_calls(spent, "curves", live.ResumedCurves, "on_train_start")
    if args.stage == "pretrain":
        from components.world.pretrain import AlignmentProbes

        time_calls(spent, "probes", AlignmentProbes, "on_train_batch_end")

    start = time.perf_counter()
    run_stage(args.stage, project)
    wall = time.perf_counter() - start
    logging = spent["curves"] + spent["grids"]
    summary = live.last_values(project.root, args.stage)
    result = {"stage": args.stage, "set": args.set, "steps": summary.get("step"), "wall_s": round(wall, 2),
              "curves_s": round(spent["curves"], 3), "grids_s": round(spent["grids"], 3),
              "logging_share": round(logging / wall, 4), "probes_s": round(spent["probes"], 2),
              "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as fh:
        fh.write(json.dumps(result) + "\n")
    shutil.rmtree(project.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
