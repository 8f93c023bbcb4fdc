"""`generate` stage: K images per curated prompt, with their recorded trajectories.

For every prompt of the chosen splits and k < images_per_prompt, one generation with
its own seed; images in groups of ``shared_noise_group`` share x_T (D3PO compares
images that start from the same noise). PNGs and trajectories (safetensors: x_T…x_0,
timesteps, per-step log-probs, prompt embeddings) go to the object store under
content-addressed keys; ``data/generations.parquet`` (DVC-tracked) points at them.

On-policy: the images are sampled from production, the model the next fine-tune
starts from, and every row records the version of the model that made it. The
manifest also keeps the generations of the models production descends from (the base
and earlier promoted versions), so the labels they were given stay in use.

Deterministic from the seeds. Resumable: each finished batch's manifest rows are
recorded in the object store (``progress/generate/<run>/``), so a killed run continues
where it stopped and yields exactly the manifest an uninterrupted run would; a model's
finished part is kept there (``manifests/generate/``) for the runs after it.

Sharded: ``python -m components.generate --shard I/N`` makes only the I-th of N
contiguous prompt ranges and records it, without writing the manifest; shards may run
on different workers (they share only the object store). The stage itself,
``python -m components.generate``, makes whatever is still missing and writes the
manifest from the records.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components import models
from components.errors import UserError
from components.project import Project
from components.sampling import SamplerConfig, Trajectories, derive_seed, sample
from components.stage import run_stage

PROMPTS_IN = Path("data/prompts.parquet")
MANIFEST_OUT = Path("data/generations.parquet")
REPORT_OUT = Path("reports/generate.json")
MANIFEST_COLUMNS = ["generation_id", "prompt_id", "prompt", "split", "model_version", "seed", "init_seed",
                    "noise_group", "sampler", "image_key", "trajectory_key"]


@dataclass(frozen=True)
class Job:
    prompt_id: str
    prompt: str
    split: str
    k: int
    seed: int  # the image's own: its step noise, or with a branch step only that step's
    init_seed: int  # x_T, shared by the noise group
    noise_group: int
    step_seed: int | None = None  # with a branch step: every other step's noise, shared by the group


def plan(prompts, images_per_prompt: int, shared_noise_group: int, seed: int, branch_step: int | None = None
         ) -> list[Job]:
    """Every generation to make, in a fixed order (prompts by id, then k)."""
    jobs = []
    for row in sorted(prompts, key=lambda r: r["id"]):
        for k in range(images_per_prompt):
            group = k // shared_noise_group
            shared = derive_seed(seed, f"{row['id']}:group{group}:steps") if branch_step is not None else None
            jobs.append(Job(prompt_id=row["id"], prompt=row["text"], split=row["split"], k=k,
                            seed=derive_seed(seed, f"{row['id']}:{k}"),
                            init_seed=derive_seed(seed, f"{row['id']}:group{group}"), noise_group=group,
                            step_seed=shared))
    return jobs


def generation_id(job: Job, model_version: str, sampler: dict) -> str:
    key = json.dumps([job.prompt_id, model_version, job.seed, job.init_seed, sampler], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def trajectory_bytes(traj: Trajectories, i: int, metadata: dict[str, str]) -> bytes:
    """safetensors bytes of one trajectory, reproducible to the byte.

    safetensors writes ``__metadata__`` from an unordered map, so several entries come
    out in a different order on every call; one JSON entry has only one order.
    """
    from safetensors.torch import save

    tensors = {
        "latents": traj.latents[i].contiguous(),
        "timesteps": traj.timesteps.contiguous(),
        "log_probs": traj.log_probs[i].contiguous(),
        **traj.cond[i].tensors("prompt"),
        **traj.uncond[i].tensors("negative"),
    }
    return save(tensors, metadata={"aligndiff": json.dumps(metadata, sort_keys=True)})


def load_trajectory(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


def trajectory_metadata(data: bytes) -> dict:
    """The generation id, prompt, model version and sampler stored with a trajectory."""
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_size])
    return json.loads(header["__metadata__"]["aligndiff"])


def _progress(total: int, done: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=False)
    task = progress.add_task("generate", total=total, completed=done, rate="")
    return progress, task


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            index, count = -1, 0
        if not 0 < index <= count:
            raise UserError(f"--shard {text}: expected I/N with 1 <= I <= N, e.g. 2/4")
        return cls(index - 1, count)

    def batches(self, total: int) -> range:
        """This shard's contiguous range of batch indices (batches follow prompt order)."""
        return range(self.index * total // self.count, (self.index + 1) * total // self.count)


@dataclass
class Part:
    """The generations of one model: its batches, and where their records go."""
    name: str
    version: str
    batches: list[list[Job]]
    progress_prefix: str  # a record per finished batch, while the part is being made
    manifest_key: str  # the part's manifest, once whole: a later run reuses it

    @classmethod
    def plan(cls, project: Project, name: str, jobs: list[Job], sampler_json: str) -> Part:
        version = models.version_of(project, name)
        batch_size = project.params.generate.batch_size
        key = hashlib.sha256(json.dumps([version, sampler_json, batch_size, [(j.prompt_id, j.seed, j.init_seed)
                                         for j in jobs]]).encode()).hexdigest()[:16]
        return cls(name, version, [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)],
                   f"progress/generate/{key}/", f"manifests/generate/{key}.parquet")


def run(project: Project, model: str | None = None, shard: Shard | None = None) -> dict:
    """Generations of ``model``, or (None) of production and every model it descends from.

    Production's are what the next annotation round labels (on-policy); its predecessors'
    were made before, so their parts come back from the object store, and keeping them
    in the manifest keeps their labels in use. A shard makes its range of the last part.
    """
    import pandas as pd
    import torch

    params = project.params
    torch.set_num_threads(params.pretrain.threads)
    prompts_path = project.path(PROMPTS_IN)
    if not prompts_path.exists():
        raise UserError(f"{prompts_path}: no curated prompts; run `dvc repro curate` first")
    prompts = pd.read_parquet(prompts_path)
    prompts = prompts[prompts["split"].isin(params.generate.splits)].to_dict("records")
    if not prompts:
        raise UserError(f"{prompts_path}: no prompts in splits {params.generate.splits} (generate.splits)")

    sampler = SamplerConfig.from_params(params.sample)
    branch_step = params.generate.branch_step
    if branch_step is not None and branch_step >= sampler.steps:
        raise UserError(f"generate.branch_step {branch_step}: expected a step below sample.steps ({sampler.steps})")
    # how the images were sampled, recorded with each (and part of its id)
    sampled_with = {**sampler.as_dict(), **({} if branch_step is None else {"branch_step": branch_step})}
    sampler_json = json.dumps(sampled_with, sort_keys=True)
    jobs = plan(prompts, params.generate.images_per_prompt, params.generate.shared_noise_group, params.seed,
                branch_step)
    parts = [Part.plan(project, name, jobs, sampler_json) for name in ([model] if model else models.lineage(project))]
    store = project.object_store()
    store.ensure_bucket()
    todo = []  # (part, batch index) still to make
    for i, part in enumerate(parts):
        if (shard and i < len(parts) - 1) or store.exists(part.manifest_key):
            continue
        recorded = set(store.list(part.progress_prefix))
        mine = shard.batches(len(part.batches)) if shard else range(len(part.batches))
        todo += [(part, b) for b in mine if _record_key(part.progress_prefix, b) not in recorded]

    t0, made = time.monotonic(), 0
    progress, task = _progress(sum(len(part.batches[b]) for part, b in todo), 0)
    with progress:
        pipe, loaded = None, None
        for part, index in todo:
            if loaded != part.name:  # one model in memory at a time
                pipe, loaded = models.on_accelerator(models.load_pipeline(models.resolve(project, part.name)),
                                                     params.sample.dtype), part.name
            made += _make_batch(store, pipe, part, index, sampler, branch_step, sampler_json)
            progress.update(task, advance=len(part.batches[index]), rate=f"{made / (time.monotonic() - t0):.2f} img/s")
    seconds = time.monotonic() - t0
    speed = {"made_this_run": made, "images_per_second": round(made / seconds, 3) if made else None}
    if shard:
        return {"shard": f"{shard.index + 1}/{shard.count}", "batches": len(shard.batches(len(parts[-1].batches))),
                "generations": sum(len(parts[-1].batches[b]) for b in shard.batches(len(parts[-1].batches))), **speed}

    manifest = pd.concat([_part_manifest(store, part) for part in parts], ignore_index=True)
    out = project.path(MANIFEST_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(out.with_suffix(".tmp"), index=False)
    out.with_suffix(".tmp").replace(out)
    # The report is a DVC output: only deterministic facts, no timings.
    report = {"generations": len(manifest), "prompts": len(prompts), "model_version": parts[-1].version,
              "models": {part.name: part.version for part in parts},
              "splits": manifest["split"].value_counts().sort_index().to_dict()}
    report_path = project.path(REPORT_OUT)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return {**report, **speed}


def _make_batch(store, pipe, part: Part, index: int, sampler: SamplerConfig, branch_step: int | None,
                sampler_json: str) -> int:
    import pandas as pd

    batch = part.batches[index]
    seeds = [j.seed for j in batch]
    if branch_step is None:
        traj = sample(pipe, [j.prompt for j in batch], seeds, sampler, init_seeds=[j.init_seed for j in batch])
    else:
        traj = sample(pipe, [j.prompt for j in batch], [j.step_seed for j in batch], sampler,
                      init_seeds=[j.init_seed for j in batch], branch_step=branch_step, branch_seeds=seeds)
    rows = []
    for i, job in enumerate(batch):
        gid = generation_id(job, part.version, json.loads(sampler_json))
        image_key = store.put_bytes(png_bytes(traj.images[i]), "images", ".png", content_type="image/png")
        traj_key = store.put_bytes(trajectory_bytes(traj, i, {"generation_id": gid, "prompt": job.prompt,
                                                              "model_version": part.version,
                                                              "sampler": sampler_json}),
                                   "trajectories", ".safetensors")
        rows.append({"generation_id": gid, "prompt_id": job.prompt_id, "prompt": job.prompt, "split": job.split,
                     "model_version": part.version, "seed": job.seed, "init_seed": job.init_seed,
                     "noise_group": job.noise_group, "sampler": sampler_json, "image_key": image_key,
                     "trajectory_key": traj_key})
    record = io.BytesIO()
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_parquet(record, index=False)
    store.put_named(_record_key(part.progress_prefix, index), record.getvalue())  # after the objects it names
    return len(batch)


def _part_manifest(store, part: Part):
    """The part's manifest: stored whole, or merged from its batch records (then stored
    whole, and the records dropped)."""
    import pandas as pd

    if store.exists(part.manifest_key):
        return pd.read_parquet(io.BytesIO(store.get_bytes(part.manifest_key)))
    keys = [_record_key(part.progress_prefix, i) for i in range(len(part.batches))]
    manifest = pd.concat([pd.read_parquet(io.BytesIO(store.get_bytes(k))) for k in keys], ignore_index=True)
    record = io.BytesIO()
    manifest.to_parquet(record, index=False)
    store.put_named(part.manifest_key, record.getvalue())
    store.delete(keys)
    return manifest


def _record_key(prefix: str, batch: int) -> str:
    return f"{prefix}batch-{batch:05d}.parquet"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m components.generate")
    parser.add_argument("--shard", metavar="I/N", help="make only the I-th of N prompt ranges (no manifest)")
    args = parser.parse_args(argv)

    def stage(project: Project) -> str:
        shard = Shard.parse(args.shard) if args.shard else None
        report = run(project, shard=shard)
        rate = f", {report['images_per_second']} images/s" if report["images_per_second"] else ""
        what = f"shard {report['shard']}: " if shard else ""
        return f"{what}{report['generations']} generations ({report['made_this_run']} made this run{rate})"

    return run_stage("generate", stage)


if __name__ == "__main__":
    sys.exit(main())
