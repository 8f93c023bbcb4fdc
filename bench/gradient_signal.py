"""Benchmark: how much of each method's first gradient is signal, and how many labels that takes.

    .venv/bin/python bench/gradient_signal.py [--scratch .aligndiff/bench/efficacy]
        [--pairs 800] [--steps 0,3,10,19] [--images 1200] [--methods d3po,reward_weighted]

Runs on the generations and labels a `learning_efficacy.py --method d3po` round left in
its scratch project. At the initial policy (θ = reference) it splits the labelled
examples into two disjoint halves and computes each half's gradient. Their cosine c
estimates how much of the gradient the labels agree on: with n examples per half and a
per-example signal-to-noise ratio ρ, ``c = nρ² / (nρ² + 1)``, so ``ρ² = c / (n(1 − c))``
and ``9/ρ²`` examples give a gradient that is 90% signal.
- D3PO: its loss on shared-x_T pairs, per denoising step (step 0 starts from x_T).
- Reward-weighted likelihood: the label-dependent part of its gradient, the denoising
  loss on images labelled good minus that on images labelled bad, at random timesteps.
Results are appended to bench/results/gradient_signal.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components import feedback, models  # noqa: E402
from components.finetune import methods, stage  # noqa: E402
from components.finetune.core import encode_images, encode_text  # noqa: E402
from components.project import Project  # noqa: E402

RESULTS = REPO / "bench" / "results" / "gradient_signal.jsonl"


def flat_grad(module, loss: torch.Tensor) -> torch.Tensor:
    params = module.trainable()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def agreement(g_a: torch.Tensor, g_b: torch.Tensor, n: int) -> dict:
    c = float(F.cosine_similarity(g_a, g_b, dim=0))
    rho2 = c / (n * (1 - c)) if 0 < c < 1 else None
    return {"n_per_half": n, "cosine": round(c, 4),
            "examples_for_90pct_signal": round(9 / rho2) if rho2 else None}


def d3po_signal(method_module, pairs: int, steps: list[int], chunk: int = 8) -> dict:
    n = min(pairs, len(method_module.pairs.winner)) // 2
    halves = [list(range(0, n)), list(range(n, 2 * n))]
    out = {}
    for step in steps:
        grads = []
        for half in halves:
            total = None
            for start in range(0, len(half), chunk):
                logits, _ = method_module.pair_logits(torch.as_tensor(half[start:start + chunk]), step)
                loss = -F.logsigmoid(logits).sum() / len(half)
                g = flat_grad(method_module, loss)
                total = g if total is None else total + g
            grads.append(total)
        out[str(step)] = agreement(*grads, n)
        print(f"d3po step {step}: {out[str(step)]}", flush=True)
    return out


def reward_weighted_signal(project: Project, pipe, gens, usable, fetch, images: int, repeats: int = 4,
                           chunk: int = 32) -> dict:
    """The label-dependent part of the reward-weighted gradient: mean gradient of the
    denoising loss on images labelled good minus that on images labelled bad (what
    weighting by the label adds to plain denoising on the model's own samples)."""
    labels = feedback.binary_labels(project.root, gens)
    labels = labels[labels["generation_id"].isin(usable.index)]
    labels = labels.sample(n=min(images, len(labels)), random_state=0).reset_index(drop=True)
    x0 = encode_images(pipe, fetch.images(list(gens.loc[labels["generation_id"], "image_key"])))
    cond = encode_text(pipe, list(labels["prompt"]))
    good = torch.from_numpy(labels["label"].to_numpy() > 0)
    module = methods.RewardWeighted(pipe, project.params.finetune, project.params.seed, x0, cond,
                                    torch.ones(len(x0)), prior_batch=None)
    n = len(x0) // 2
    grads = []
    for h, half in enumerate((torch.arange(0, n), torch.arange(n, 2 * n))):
        g_good, g_bad = good[half].sum().clamp(min=1), (~good[half]).sum().clamp(min=1)
        sign = torch.where(good[half], 1 / g_good, -1 / g_bad) / repeats
        total = None
        for r in range(repeats):  # several timesteps per image, as training would over its epochs
            for start in range(0, n, chunk):
                index = half[start:start + chunk]
                mse = module.random_mse(x0[index], cond[index], f"signal:{h}:{r}:{start}")
                g = flat_grad(module, (sign[start:start + chunk] * mse).sum())
                total = g if total is None else total + g
        grads.append(total)
    result = {**agreement(*grads, n), "good_share": round(float(good.float().mean()), 3)}
    print(f"reward_weighted (good − bad): {result}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scratch", default=str(REPO / ".aligndiff" / "bench" / "efficacy"))
    ap.add_argument("--pairs", type=int, default=600, help="D3PO pairs used (two halves)")
    ap.add_argument("--steps", default="0,3,10,19", help="D3PO denoising steps measured")
    ap.add_argument("--images", type=int, default=1200, help="labelled images used for reward-weighted")
    ap.add_argument("--methods", default="d3po,reward_weighted")
    args = ap.parse_args()
    project = Project.load(args.scratch)
    torch.set_num_threads(project.params.finetune.threads)
    torch.manual_seed(0)
    gens = feedback.generations(project.root)
    usable = stage.usable_generations(gens, project.params)
    fetch = feedback.Fetcher(project.object_store())
    result = {"scratch": args.scratch, "images_per_prompt": project.params.generate.images_per_prompt,
              "sample_steps": project.params.sample.steps}
    start = time.monotonic()

    chosen = args.methods.split(",")
    if "d3po" in chosen:
        pipe = models.load_pipeline(models.resolve(project, "base"))
        module, data = stage.build_d3po(project, pipe, gens, usable, fetch)
        result["d3po"] = {"data": data, "steps": d3po_signal(module, args.pairs,
                                                             [int(s) for s in args.steps.split(",")])}
    if "reward_weighted" in chosen:
        pipe = models.load_pipeline(models.resolve(project, "base"))
        result["reward_weighted"] = reward_weighted_signal(project, pipe, gens, usable, fetch, args.images)
    result["minutes"] = round((time.monotonic() - start) / 60, 2)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as fh:
        fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
