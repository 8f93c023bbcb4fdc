"""Benchmark: how many labelled pairs make D3PO's first gradient 90% signal —
standard pairs against step-level (branch) pairs, on the same labelling budget.

    .venv/bin/python bench/gradient_signal.py [--pairs 1000] [--branch-steps 0,1,2,4,7,11]
        [--standard-steps 0,1,2,4,7,11,19] [--splits 40] [--seed 0] [--model models/base]
        [--min-distance 0.05]

Self-contained: samples the world base (no services), labels with the simulated
annotators' policy (3 votes, 10% flips, majority; ties carry no preference but use the
budget), and measures at the initial policy (θ = reference: a fresh LoRA).

- standard: both images of a pair share x_T, every step's noise differs (what
  ``generate.shared_noise_group: 2`` makes); the gradient is measured at each of
  ``--standard-steps``.
- branch at k: both images share x_T and every step's noise but step k's, so they differ
  only by what step k drew and their label speaks to step k alone (SPO's credit
  assignment); the gradient is that of step k.
- ``--min-distance D``: a pair whose two images are closer than D (RMS over pixels in
  [0, 1]) is not sent to annotators, and pairs are sampled until the budget's n pass:
  a label on two near-identical images is mostly a tie. Each variant reports the
  deciles of that distance for its decided pairs and its ties, which is what picks D.
- reward-weighted (for scale): the label-dependent part of its gradient, the denoising
  loss of the standard pairs' images labelled good minus that of those labelled bad.

Each pair has its own x_T, so pairs are independent. From every pair's gradient (their
Gram matrix) :func:`signal` reports, for the n labelled pairs:
- split halves, as asked of this bench: the cosine c of two random halves' gradients
  (no image, no x_T in both), median and 10th–90th percentile over ``--splits`` splits.
  With per-pair signal-to-noise ρ², ``c = (n/2)ρ²/((n/2)ρ² + 1)``. All splits share the
  one total gradient, so their median carries that draw's noise: where the null below
  found no signal, the medians ranged −0.09 to +0.11 at 500 pairs per half;
- ρ² estimated without bias from all pairs at once, ``9/ρ²`` pairs for a 90%-signal
  gradient, with the 10th–90th percentile over half-samples;
- the null: ρ² when each decided pair's preference is flipped at random; its 95th
  percentile is the least signal this budget can tell from none, and ``p_value`` is the
  share of the null at or above the measured ρ².
Appended to bench/results/gradient_signal.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components import models  # noqa: E402
from components.annotation import oracle  # noqa: E402
from components.annotation.simulate import AnnotatorConfig  # noqa: E402
from components.evaluate import distance  # noqa: E402
from components.finetune.core import attach_policy, denoising_mse  # noqa: E402
from components.project import Project  # noqa: E402
from components.sampling import (Conditioning, SamplerConfig, derive_seed, sample, step_log_prob,  # noqa: E402
                                 timestep_pairs)
from components.world.training import seen_compositions  # noqa: E402

RESULTS = REPO / "bench" / "results" / "gradient_signal.jsonl"


def make_pairs(pipe, prompts: list[str], n: int, seed: int, sampler: SamplerConfig, branch_step: int | None,
               min_distance: float = 0.0, batch: int = 64) -> dict:
    """n pairs (2n samples, a pair's two adjacent) with their trajectories and images.

    With ``min_distance``, a pair whose two images are closer than that (RMS over pixels in
    [0, 1]) is never shown to annotators: more are sampled until n pass, and ``sampled``
    says how many it took. The screen costs sampling, not labels.
    """
    latents, conds, unconds, images, texts, kept, sampled = [], [], [], [], [], 0, 0
    while kept < n:
        if sampled >= 20 * n:
            raise SystemExit(f"--min-distance {min_distance}: only {kept} of {sampled} pairs pass; lower it")
        pairs = range(sampled, sampled + batch // 2)
        sampled = pairs.stop
        texts_b = [prompts[i % len(prompts)] for i in pairs for _ in range(2)]
        x_t = [derive_seed(seed, f"pair{i}:x_T") for i in pairs for _ in range(2)]
        own = [derive_seed(seed, f"pair{i}:{side}") for i in pairs for side in "ab"]
        if branch_step is None:
            traj = sample(pipe, texts_b, own, sampler, init_seeds=x_t)
        else:
            shared = [derive_seed(seed, f"pair{i}:steps") for i in pairs for _ in range(2)]
            traj = sample(pipe, texts_b, shared, sampler, init_seeds=x_t, branch_step=branch_step, branch_seeds=own)
        apart = np.flatnonzero(distance(traj.images[0::2], traj.images[1::2]) >= min_distance)[:n - kept]
        rows = torch.from_numpy(np.stack([2 * apart, 2 * apart + 1], axis=1).reshape(-1))
        latents.append(traj.latents[rows])
        conds.append(traj.cond[rows])
        unconds.append(traj.uncond[rows])
        images.append(traj.images[rows.numpy()])
        texts += [texts_b[i] for i in rows.tolist()]
        kept += len(apart)
        print(f"  {kept}/{n} pairs ({sampled} sampled)", end="\r", flush=True)
    return {"latents": torch.cat(latents), "cond": Conditioning.cat(conds), "uncond": Conditioning.cat(unconds),
            "images": np.concatenate(images), "prompts": texts, "timesteps": traj.timesteps, "sampled": sampled}


def label_pairs(data: dict, n: int, annotators: AnnotatorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: +1 the first image won, −1 the second, 0 a tie; and per image: binary
    majority (+1 good, −1 bad, 0 tie). Exactly the simulated annotators of a real round."""
    ids = [f"{i}{side}" for i in range(n) for side in "ab"]
    gens = pd.DataFrame({"prompt": data["prompts"], "prompt_id": [i // 2 for i in range(2 * n)],
                         "noise_group": 0}, index=ids)
    images = dict(zip(ids, data["images"]))
    _, prefs = oracle.label(gens, images, annotators, binary=False)  # the pairwise tasks' preferences only
    pair = np.zeros(n)
    for p in prefs.itertuples():
        pair[int(p.winner[:-1])] = 1 if p.winner.endswith("a") else -1
    tasks, _ = oracle.label(gens, images, annotators, pairwise=False)
    good = np.zeros(2 * n)
    for t in tasks.itertuples():
        good[ids.index(t.generation_ids[0])] = {"good": 1, "bad": -1}.get(t.majority, 0)
    return pair, good


def flat_grad(unet, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in unet.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def d3po_gram(pipe, data: dict, prefer: np.ndarray, step: int, sampler: SamplerConfig) -> tuple[np.ndarray, np.ndarray]:
    """(decided pairs, Gram matrix of their signed per-pair gradients) at one step.

    A pair's gradient is that of prefer·(log π(a) − log π(b)) at the step: D3PO's first
    update is its sum (at θ = ref the ratio is 1 and no clamp binds). Ties give none.
    """
    unet, scheduler = pipe.unet, pipe.scheduler
    _, prevs = timestep_pairs(scheduler, len(data["timesteps"]))
    t, prev_t = int(data["timesteps"][step]), int(prevs[step])
    decided = np.flatnonzero(prefer != 0)
    grads = []
    for i in decided:
        rows = torch.tensor([2 * i, 2 * i + 1])
        log_p = step_log_prob(unet, scheduler, data["latents"][rows, step], t, prev_t, data["latents"][rows, step + 1],
                              data["cond"][rows], data["uncond"][rows], sampler)
        grads.append(flat_grad(unet, float(prefer[i]) * (log_p[0] - log_p[1])))
    g = torch.stack(grads).double()
    return decided, (g @ g.T).numpy()


def reward_weighted_gram(pipe, data: dict, good: np.ndarray, seed: int, repeats: int = 4
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The same for the label-dependent part of reward-weighted's gradient: per pair (its
    two images share x_T), the denoising-loss gradient of its images labelled good minus
    that of those labelled bad, each class weighted by its inverse share, each image at
    ``repeats`` random timesteps."""
    unet, scheduler = pipe.unet, pipe.scheduler
    x0 = data["latents"][:, -1]
    share = {1: (good > 0).mean(), -1: (good < 0).mean()}
    weight = np.array([g / share[g] if g else 0.0 for g in good])
    decided = np.flatnonzero(weight.reshape(-1, 2).any(1))
    grads = []
    for i in decided:
        rows = torch.tensor([2 * i, 2 * i + 1]).repeat(repeats)
        gen = torch.Generator().manual_seed(derive_seed(seed, f"rw:{i}"))
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(rows),), generator=gen)
        noise = torch.randn(x0[rows].shape, generator=gen)
        mse = denoising_mse(unet, scheduler, x0[rows], data["cond"][rows], t, noise)
        signed = torch.as_tensor(weight[rows.numpy()], dtype=torch.float32) * mse
        grads.append(flat_grad(unet, signed.sum() / repeats))
    g = torch.stack(grads).double()
    return decided, (g @ g.T).numpy()


def snr(gram: np.ndarray, n: int) -> float:
    """Unbiased per-pair signal-to-noise ρ² = ‖E g‖² / E‖g − E g‖² from the Gram matrix of
    the non-zero pair gradients among n (the zero ones: ties)."""
    total, trace = gram.sum(), np.trace(gram)
    mean_sq = (total - trace) / (n * (n - 1))
    variance = (trace - total / n) / (n - 1)
    return mean_sq / variance


def signal(decided: np.ndarray, gram: np.ndarray, n: int, splits: int, seed: int, draws: int = 200) -> dict:
    """How much of the summed gradient of n labelled pairs is signal, three ways:

    - split halves: the cosine of the gradients of two random halves (pairs are dealt
      whole, and each has its own x_T, so no image or x_T is in both), median and
      10th–90th percentile over ``splits`` splits; ``9(1 − c)(n/2)/c`` pairs for 90% signal;
    - ρ², unbiased, over all n (10th–90th percentile over half-samples, conservative);
    - null: ρ² with every decided pair's preference flipped at random (labels without
      information): the 95th percentile is what this budget can tell from noise.
    """
    rng = np.random.default_rng(seed)
    cosines = []
    for _ in range(splits):
        side = (rng.permutation(n) < n // 2)[decided].astype(float)
        a, b = side, 1 - side
        cosines.append((a @ gram @ b) / np.sqrt((a @ gram @ a) * (b @ gram @ b)))
    lo, med, hi = np.percentile(cosines, [10, 50, 90])
    half = n // 2

    def from_cosine(c: float) -> int | None:
        return round(9 * (1 - c) * half / c) if 0 < c < 1 else None

    def pairs(rho2: float) -> int | None:
        return round(9 / rho2) if rho2 > 0 else None

    rho2 = snr(gram, n)
    halves = []
    for _ in range(draws):
        keep = rng.permutation(n)[:half]
        inside = np.isin(decided, keep)
        halves.append(snr(gram[np.ix_(inside, inside)], half))
    null = [snr(gram * np.outer(s, s), n) for s in (rng.choice([-1.0, 1.0], len(decided)) for _ in range(draws))]
    return {"labelled_pairs": n, "decided": len(decided),
            "split_cosine": {"median": round(float(med), 4), "p10_p90": [round(float(lo), 4), round(float(hi), 4)],
                             "pairs_for_90pct_signal": from_cosine(med)},
            "rho2": float(f"{rho2:.3g}"), "pairs_for_90pct_signal": pairs(rho2),
            # from the 90th and 10th percentile of ρ² (None: no signal)
            "pairs_for_90pct_signal_range": [pairs(float(np.percentile(halves, 90))),
                                             pairs(float(np.percentile(halves, 10)))],
            "null_rho2_p95": float(f"{np.percentile(null, 95):.3g}"),
            "p_value": round(float(np.mean(np.array(null) >= rho2)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "models" / "base"))
    ap.add_argument("--pairs", type=int, default=1000, help="labelled pairs per variant (the labelling budget)")
    ap.add_argument("--branch-steps", default="0,1,2,4,7,11", help="k of the step-level pairs")
    ap.add_argument("--standard-steps", default="0,1,2,4,7,11,19", help="steps measured on standard pairs")
    ap.add_argument("--splits", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-reward-weighted", action="store_true")
    ap.add_argument("--min-distance", type=float, default=0.0,
                    help="pairs whose images are closer (RMS, [0, 1]) are not labelled; more are sampled instead")
    args = ap.parse_args()
    project = Project.load(REPO)
    params = project.params
    torch.set_num_threads(params.finetune.threads)
    torch.manual_seed(args.seed)
    sampler = SamplerConfig.from_params(params.sample)
    pipe = models.load_pipeline(Path(args.model))
    attach_policy(pipe, params.finetune.lora)
    prompts = [c.prompt for c in seen_compositions(params.world.holdout)]
    annotators = AnnotatorConfig(seed=args.seed)
    result = {"model_version": models.model_version(Path(args.model)), "seed": args.seed, "pairs": args.pairs,
              "splits": args.splits, "sampler": sampler.as_dict(), "lora_rank": params.finetune.lora.rank,
              "min_distance": args.min_distance, "variants": {}}
    start = time.monotonic()
    variants = [("standard", None)] + [(f"branch@{k}", int(k)) for k in args.branch_steps.split(",") if k]
    for name, k in variants:
        t0 = time.monotonic()
        data = make_pairs(pipe, prompts, args.pairs, derive_seed(args.seed, name), sampler, k, args.min_distance)
        prefer, good = label_pairs(data, args.pairs, annotators)
        steps = [int(s) for s in args.standard_steps.split(",")] if k is None else [k]
        apart = distance(data["images"][0::2], data["images"][1::2])
        row = {"decided_share": round(float((prefer != 0).mean()), 3), "sampled_pairs": data["sampled"],
               # the pair's RMS image distance: deciles, of decided pairs and of ties (what --min-distance screens on)
               "distance_deciles": {name: [round(float(q), 4) for q in np.percentile(apart[mask], np.arange(10, 100, 10))]
                                    for name, mask in (("decided", prefer != 0), ("tie", prefer == 0)) if mask.any()},
               "steps": {}}
        for step in steps:
            decided, gram = d3po_gram(pipe, data, prefer, step, sampler)
            row["steps"][str(step)] = signal(decided, gram, args.pairs, args.splits, args.seed)
            print(f"{name} step {step}: {row['steps'][str(step)]}", flush=True)
        if k is None and not args.no_reward_weighted:
            decided, gram = reward_weighted_gram(pipe, data, good, args.seed)
            row["reward_weighted"] = {**signal(decided, gram, args.pairs, args.splits, args.seed),
                                      "good_share": round(float((good > 0).mean()), 3)}
            print(f"reward_weighted (good − bad) on the standard pairs' images: {row['reward_weighted']}", flush=True)
        row["minutes"] = round((time.monotonic() - t0) / 60, 2)
        print(f"{name}: {row['decided_share']:.0%} of pairs decided ({data['sampled']} sampled), {row['minutes']} min",
              flush=True)
        result["variants"][name] = row
    result["minutes"] = round((time.monotonic() - start) / 60, 2)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as fh:
        fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
