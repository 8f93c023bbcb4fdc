"""`finetune` stage: fine-tune the production model with ``finetune.method`` (Lightning).

Data (all from versioned inputs, so ``dvc repro`` needs no service but the object store):

- d3po: labelled preference pairs whose images share x_T, with their trajectories;
- diffusion_dpo: labelled preference pairs (any images);
- reward_weighted: binary labels, plus unlabelled generations the learned reward
  calls good (semi-supervised), plus a prior batch from the pre-training distribution;
- prdp: the train prompts, sampled online and scored by the learned reward.

Only generations of ``train`` prompts are used, and in the world profile never a
composition held out of pre-training, so evaluation on them measures generalisation.

Checkpoints go to ``<state>/checkpoints/finetune/<run key>``: a killed run resumes
where it stopped when the stage is re-run with the same inputs.
Outputs: ``models/candidate`` (a diffusers LoRA adapter + candidate.json, or a full
pipeline), ``reports/finetune.json``, and in ``reports/live/finetune`` (DVCLive) the
training curves with sample grids of the policy at ``finetune.sample_grid_every`` steps.
Run as a stage: ``python -m components.finetune.stage``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch

from components import feedback, live, models
from components.config import Params
from components.errors import UserError
from components.finetune import methods
from components.finetune.core import encode_images, encode_text, save_candidate
from components.progress import on_terminal, progress_callbacks
from components.project import Project
from components.sampling import Conditioning, SamplerConfig, derive_seed

CANDIDATE_OUT = Path("models/candidate")
REWARD_MODEL = Path("models/reward")
PROMPTS = Path("data/prompts.parquet")
REPORT_OUT = Path("reports/finetune.json")


def usable_generations(gens: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Generations of train prompts; in the world, none of a held-out composition."""
    keep = gens["split"] == "train"
    if params.profile == "world":
        from components.world.grammar import parse_prompt

        def held_out(prompt: str) -> bool:
            c = parse_prompt(prompt)
            return c is not None and f"{c.count_word} {c.colour}" in params.world.holdout

        keep &= ~gens["prompt"].map(held_out)
    return gens[keep]


def epoch_schedule(n: int, batch: int, epochs: int, seed: int) -> list[np.ndarray]:
    """Batches of example indices: every epoch a fresh seeded permutation."""
    out = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        out += [order[i:i + batch] for i in range(0, n, batch)]
    return out


def _pairs(root: Path, gens: pd.DataFrame, usable: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    prefs = feedback.preference_pairs(root, gens)
    ok = prefs["winner"].isin(usable.index) & prefs["loser"].isin(usable.index)
    return prefs[ok].reset_index(drop=True), int((~ok).sum())


def group_schedule(groups: np.ndarray, pairs_per_batch: int, epochs: int, seed: int) -> list[np.ndarray]:
    """Batches of pair indices made of whole groups (the pairs of one x_T), each at least
    ``pairs_per_batch`` pairs but an epoch's last; every epoch a fresh seeded group order.
    With one pair per group this is :func:`epoch_schedule`."""
    labels, members = np.unique(groups, return_inverse=True)
    by_group = [np.flatnonzero(members == g) for g in range(len(labels))]
    out = []
    for epoch in range(epochs):
        batch: list[int] = []
        for g in np.random.default_rng([seed, epoch]).permutation(len(by_group)):
            batch += by_group[g].tolist()
            if len(batch) >= pairs_per_batch:
                out.append(np.array(batch))
                batch = []
        if batch:
            out.append(np.array(batch))
    return out


def build_d3po(project: Project, pipe, gens, usable, fetch) -> tuple[L.LightningModule, dict]:
    cfg = project.params.finetune
    prefs, outside = _pairs(project.root, gens, usable)

    def x_t(ids):  # the starting noise an image was sampled from: its prompt and x_T seed
        return (gens.loc[ids, "prompt"] + "\0" + gens.loc[ids, "init_seed"].astype(str)).to_numpy()

    groups = x_t(prefs["winner"])
    shared = groups == x_t(prefs["loser"])
    prefs, groups = prefs[shared].reset_index(drop=True), groups[shared]
    if not len(prefs):
        raise UserError(f"{feedback.PREFERENCES}: no labelled pair of train generations shares its initial noise; "
                        "D3PO needs pairwise labels on images generated with generate.shared_noise_group ≥ 2")
    # On-policy: the trajectories' log-probs are the starting model's only if it sampled them.
    start = models.version_of(project, cfg.init)
    made = gens.loc[prefs["winner"], "model_version"].to_numpy()
    mine = (made == start) & (gens.loc[prefs["loser"], "model_version"].to_numpy() == start)
    if not mine.any():
        found = ", ".join(sorted(set(made)))
        raise UserError(f"{feedback.PREFERENCES}: none of the {len(prefs)} labelled pairs was sampled by {cfg.init} "
                        f"(model {start}), the model D3PO starts from (they come from {found}); D3PO learns "
                        "on-policy: label a round of its generations first (`aligndiff run annotation_round`)")
    prefs, groups = prefs[mine].reset_index(drop=True), groups[mine]
    ids = sorted({*prefs["winner"], *prefs["loser"]})
    position = pd.Series(range(len(ids)), index=ids)
    recorded = feedback.sampler_of(gens, ids)
    branch_step = recorded.get("branch_step")  # step-level pairs: their label speaks to that step alone
    sampler = SamplerConfig(**{k: v for k, v in recorded.items() if k not in ("sampler", "branch_step")})
    trajectories = fetch.trajectories(list(gens.loc[ids, "trajectory_key"]))
    pairs = methods.TrajectoryPairs(
        latents=torch.stack([t["latents"] for t in trajectories]),
        cond=Conditioning.stack([Conditioning.from_tensors(t, "prompt") for t in trajectories]),
        uncond=Conditioning.stack([Conditioning.from_tensors(t, "negative") for t in trajectories]),
        timesteps=trajectories[0]["timesteps"],
        winner=torch.tensor(position[prefs["winner"]].to_numpy()),  # a copy: pandas' array is read-only
        loser=torch.tensor(position[prefs["loser"]].to_numpy()))
    module = methods.D3PO(pipe, cfg, project.params.seed, pairs, sampler, branch_step)
    module.schedule = group_schedule(groups, cfg.d3po.pairs_per_batch, cfg.d3po.epochs, project.params.seed)
    return module, {"pairs": len(prefs), "trajectories": len(ids), "pairs_without_shared_noise": int((~shared).sum()),
                    "pairs_outside_train_prompts": outside, "pairs_of_other_models": int((~mine).sum()),
                    "trained_steps": "all" if branch_step is None else [branch_step]}


def build_diffusion_dpo(project: Project, pipe, gens, usable, fetch):
    cfg = project.params.finetune
    prefs, outside = _pairs(project.root, gens, usable)
    if not len(prefs):
        raise UserError(f"{feedback.PREFERENCES}: no preference pair of train generations to learn from")
    winner = encode_images(pipe, fetch.images(list(gens.loc[prefs["winner"], "image_key"])))
    loser = encode_images(pipe, fetch.images(list(gens.loc[prefs["loser"], "image_key"])))
    module = methods.DiffusionDPO(pipe, cfg, project.params.seed, winner, loser,
                                  encode_text(pipe, list(prefs["prompt"])))
    epochs = math.ceil(cfg.diffusion_dpo.steps * cfg.diffusion_dpo.pairs_per_batch / len(prefs))
    module.schedule = epoch_schedule(len(prefs), cfg.diffusion_dpo.pairs_per_batch, epochs, project.params.seed)
    return module, {"pairs": len(prefs), "pairs_outside_train_prompts": outside}


def learned_reward(project: Project):
    path = project.path(REWARD_MODEL)
    if not (path / "config.json").exists():
        raise UserError(f"{path}: no reward model; build it with `dvc repro train_reward`")
    from components.reward.model import load_scorer

    scorer = load_scorer(project, path)
    return lambda images, prompts: scorer.score(images, prompts)[0]


def build_reward_weighted(project: Project, pipe, gens, usable, fetch):
    params = project.params
    cfg = params.finetune
    labels = feedback.binary_labels(project.root, gens)
    labels = labels[labels["generation_id"].isin(usable.index)]
    unlabelled = usable[~usable.index.isin(labels["generation_id"])]
    ids = [*labels["generation_id"], *unlabelled.index]
    images = fetch.images(list(gens.loc[ids, "image_key"]))
    prompts = list(gens.loc[ids, "prompt"])
    weights = np.concatenate([labels["label"].to_numpy(np.float32), np.zeros(len(unlabelled), np.float32)])
    if len(unlabelled) and project.path(REWARD_MODEL).exists():
        scores = learned_reward(project)(images[len(labels):], prompts[len(labels):])
        weights[len(labels):] = (scores >= cfg.reward_weighted.reward_threshold).astype(np.float32)
    good = np.flatnonzero(weights > 0)
    if not len(good):
        raise UserError(f"{feedback.TASKS}: no train generation is labelled (or scored) good; "
                        "reward-weighted fine-tuning only learns from good images")
    x0 = encode_images(pipe, images[good])
    cond = encode_text(pipe, [prompts[i] for i in good])
    module = methods.RewardWeighted(pipe, cfg, params.seed, x0, cond, torch.from_numpy(weights[good]),
                                    prior_batches(project, pipe, gens, fetch))
    module.schedule = epoch_schedule(len(good), cfg.reward_weighted.batch_size, cfg.reward_weighted.epochs,
                                     params.seed)
    return module, {"good_labelled": int((weights[:len(labels)] > 0).sum()), "labelled": int(len(labels)),
                    "good_scored": int((weights[len(labels):] > 0).sum()), "unlabelled": int(len(unlabelled))}


def prior_batches(project: Project, pipe, gens, fetch):
    """(x0, prompt embeddings) of the pre-training distribution, a pure function of the step.

    World: freshly rendered scenes under the same noisy captions as pre-training. Other
    profiles have no pre-training corpus here: the base model's own generations stand in.
    """
    params = project.params
    size = params.finetune.reward_weighted.batch_size
    if params.profile == "world":
        from components.world.training import noisy_caption, renders, seen_compositions

        seen = seen_compositions(params.world.holdout)

        def world_batch(step: int):
            rng, comps, images = renders(params.seed, "finetune:prior", step, size, seen)
            captions = [noisy_caption(c, rng, params.pretrain, params.world.holdout) for c in comps]
            return encode_images(pipe, images), encode_text(pipe, captions)

        return world_batch
    ids = list(gens.index)

    def generated_batch(step: int):
        chosen = [ids[i] for i in np.random.default_rng([params.seed, step]).integers(len(ids), size=size)]
        return (encode_images(pipe, fetch.images(list(gens.loc[chosen, "image_key"]))),
                encode_text(pipe, list(gens.loc[chosen, "prompt"])))

    return generated_batch


def build_prdp(project: Project, pipe, gens, usable, fetch):
    params = project.params
    prompts = sorted(set(usable["prompt"]))
    if len(prompts) < 2:
        raise UserError(f"{feedback.GENERATIONS}: PRDP needs train prompts; found {len(prompts)}")
    module = methods.PRDP(pipe, params.finetune, params.seed, prompts, learned_reward(project),
                          SamplerConfig.from_params(params.sample))
    module.schedule = [np.zeros(0, int)]  # PRDP samples its own data every epoch
    return module, {"prompts": len(prompts)}


BUILDERS = {"d3po": build_d3po, "prdp": build_prdp, "reward_weighted": build_reward_weighted,
            "diffusion_dpo": build_diffusion_dpo}


def total_steps(params: Params, module) -> int:
    cfg = params.finetune
    if cfg.method == "prdp":
        return cfg.prdp.epochs * cfg.prdp.updates_per_epoch
    if cfg.method in ("d3po", "reward_weighted"):  # epochs over the data
        return len(module.schedule)
    return getattr(cfg, cfg.method).steps


def run_key(params: Params, inputs: list[Path], base_version: str) -> str:
    """Checkpoints resume only a run of the same method, settings, data and base model."""
    digest = hashlib.sha256(json.dumps({"finetune": params.finetune.model_dump(), "seed": params.seed,
                                        "sample": params.sample.model_dump(), "base": base_version},
                                       sort_keys=True).encode())
    for path in inputs:
        for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
            digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


def sample_grids(project: Project) -> live.SampleGrids:
    """The policy's samples of the first four eval prompts (the evaluation grid's first
    rows), two fixed seeds each, every ``finetune.sample_grid_every`` steps (a grid costs
    ≈ 1 s on 2 cores: bench/logging_overhead.py)."""
    params = project.params
    prompts = feedback.read_table(project.root, PROMPTS, ["id", "text", "split"], "run `dvc repro curate`")
    texts = list(prompts[prompts["split"] == "eval"].sort_values("id")["text"].head(4))
    seeds = [derive_seed(params.seed, f"finetune-grid:{k}") for k in range(2)]
    return live.SampleGrids(lambda module: module.pipe, texts, seeds, SamplerConfig.from_params(params.sample),
                            params.finetune.sample_grid_every)


def trainer_for(cfg, steps: int, callbacks: list, logger: live.StageLogger | None = None
                ) -> tuple[L.Trainer, torch.utils.data.DataLoader]:
    """The Trainer (the engineering: devices, precision, accumulation, clipping, logging)
    and the step loader; the modules draw their own batches, so the loader only counts
    micro-batches."""
    trainer = L.Trainer(
        max_steps=steps, accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
        num_nodes=cfg.num_nodes, precision=cfg.precision, accumulate_grad_batches=cfg.accumulate_grad_batches,
        gradient_clip_val=cfg.gradient_clip, logger=logger or False, log_every_n_steps=1,
        enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the loader only counts steps: every process counts them all
        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks),
        callbacks=[*callbacks, *([live.ResumedCurves()] if logger else []),
                   *progress_callbacks(f"finetune ({cfg.method})")], enable_progress_bar=on_terminal())
    return trainer, torch.utils.data.DataLoader(range(steps * cfg.accumulate_grad_batches), batch_size=1)


def examples_per_process(module, trainer) -> dict:
    """How the training examples were split over the processes: the number each trained on,
    and how many (micro-batch, example) it shared with another process (0: data parallel)."""
    seen = [module.seen]
    if trainer.world_size > 1:
        import torch.distributed as dist

        seen = [None] * trainer.world_size
        dist.all_gather_object(seen, module.seen)
    counts = [len(s) for s in seen]
    distinct = len(set().union(*map(set, seen)))
    return {"count": trainer.world_size, "examples": counts, "examples_in_two_processes": sum(counts) - distinct}


def finetune(project: Project) -> dict:
    params, root = project.params, project.root
    cfg = params.finetune
    torch.set_num_threads(cfg.threads)
    L.seed_everything(params.seed, verbose=False)
    where = models.resolve(project, cfg.init)
    base_version = models.version_of(project, cfg.init)
    pipe = models.on_accelerator(models.load_pipeline(where))  # float32 weights: Lightning's precision casts
    gens = feedback.generations(root)
    usable = usable_generations(gens, params)
    module, data = BUILDERS[cfg.method](project, pipe, gens, usable, feedback.Fetcher(project.object_store()))
    steps = total_steps(params, module)

    inputs = [p for p in (root / "data/labels", root / feedback.GENERATIONS, root / REWARD_MODEL) if p.exists()]
    ckpt_dir = project.state_dir / "checkpoints" / "finetune" / run_key(params, inputs, base_version)
    last = ckpt_dir / "last.ckpt"
    every = cfg.checkpoint_every
    if cfg.method == "prdp":  # checkpoint at epoch boundaries: a resumed run re-samples exactly there
        every = math.ceil(every / cfg.prdp.updates_per_epoch) * cfg.prdp.updates_per_epoch
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=every, save_last=True,
                                                      save_top_k=0)
    grids = [sample_grids(project)] if cfg.sample_grid_every else []
    trainer, loader = trainer_for(cfg, steps, [checkpoints, *grids],
                                  live.StageLogger(root, "finetune", resuming=last.exists()))
    trainer.fit(module, loader, ckpt_path=str(last) if last.exists() else None)
    per_process = examples_per_process(module, trainer)
    if not trainer.is_global_zero:  # the processes hold the same weights: one writes them
        return {}

    relative_base = where if isinstance(where, str) else os.path.relpath(where, root / CANDIDATE_OUT)
    description = {"method": cfg.method, "base_version": base_version, "steps": steps, "data": data,
                   "processes": per_process}
    save_candidate(pipe, root / CANDIDATE_OUT, cfg.lora, relative_base, description)
    final = {k: round(v, 6) for k, v in live.last_values(root, "finetune").items()}
    report = {**description, "final": final}
    (root / REPORT_OUT).parent.mkdir(parents=True, exist_ok=True)
    (root / REPORT_OUT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return report


def _stage(project: Project) -> str:
    report = finetune(project)
    if not report:
        return ""
    return f"{report['method']}: {report['steps']} steps on {json.dumps(report['data'])}; final {report['final']}"


def main() -> int:
    from components.stage import run_stage

    return run_stage("finetune", _stage)


if __name__ == "__main__":
    sys.exit(main())
