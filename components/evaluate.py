"""`evaluate` stage: the candidate against production on held-out prompts, same seeds.

For every eval-split prompt, ``evaluate.images_per_prompt`` images from each model with
identical seeds (x_T and step noise), the sampler of ``sample:``. Metrics:

- learned reward: mean for each model, and the candidate's win rate over production,
  paired by prompt and seed (a tie counts half), with a 95% interval from resampling
  whole prompts (a prompt's images are not independent draws); in the world profile
  also the win rate split by how the judge's verdict changed between the pair's images
  (improved / unchanged / worsened), which says whether the reward agrees with the judge
  where the judge sees a difference, and how it ranks where it sees none;
- judge alignment (world profile): overall and per attribute, on all eval prompts and
  on the compositions held out of pre-training;
- diversity: mean pairwise distance between a prompt's images (per model), and its drop;
- drift: mean distance of each candidate image to production's image of the same seed;
- memorization: share of candidate images whose nearest training image (the
  generations the fine-tune learned from) is within ``evaluate.near_copy_distance``.

Distances are RMS over pixels in [0, 1]. Writes ``reports/evaluation.json``
(``dvc metrics``), ``reports/evaluation_prompts.csv`` (per prompt, for ``dvc plots``),
``reports/evaluation.md`` with ``reports/evaluation_grid.png`` (rows = prompts, columns =
production | candidate, same seeds). Run as a stage: ``python -m components.evaluate``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from components import feedback, models
from components.errors import UserError
from components.project import Project
from components.sampling import SamplerConfig, derive_seed, sample

CANDIDATE = Path("models/candidate")
METRICS_OUT = Path("reports/evaluation.json")
PROMPTS_OUT = Path("reports/evaluation_prompts.csv")
REPORT_OUT = Path("reports/evaluation.md")
GRID_OUT = Path("reports/evaluation_grid.png")


def draw(pipe, prompts: list[str], ids: list[str], per_prompt: int, seed: int, config: SamplerConfig,
         batch_size: int = 64) -> np.ndarray:
    """uint8 images (P·K, H, W, 3), prompt-major; the seeds depend only on (prompt id, k)."""
    jobs = [(p, derive_seed(seed, f"evaluate:{i}:{k}")) for p, i in zip(prompts, ids) for k in range(per_prompt)]
    out = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        out.append(sample(pipe, [p for p, _ in chunk], [s for _, s in chunk], config, record=False).images)
    return np.concatenate(out)


def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RMS distance in [0, 1] between matching uint8 images."""
    diff = (a.astype(np.float32) - b.astype(np.float32)) / 255.0
    return np.sqrt((diff ** 2).reshape(len(diff), -1).mean(axis=1))


def diversity(images: np.ndarray, per_prompt: int) -> np.ndarray:
    """Per prompt: mean pairwise distance between its images."""
    groups = images.reshape(-1, per_prompt, *images.shape[1:])
    i, j = np.triu_indices(per_prompt, k=1)
    return np.array([distance(g[i], g[j]).mean() if len(i) else 0.0 for g in groups])


def nearest_distance(images: np.ndarray, reference: np.ndarray, chunk: int = 256) -> np.ndarray:
    """For each image, the distance to its nearest neighbour in ``reference``."""
    if not len(reference):
        return np.full(len(images), np.inf)
    ref = reference.reshape(len(reference), -1).astype(np.float32) / 255.0
    ref_sq = (ref ** 2).sum(axis=1)
    out = []
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].reshape(-1, ref.shape[1]).astype(np.float32) / 255.0
        sq = (x ** 2).sum(axis=1)[:, None] + ref_sq[None, :] - 2 * x @ ref.T
        out.append(np.sqrt(np.maximum(sq.min(axis=1), 0) / ref.shape[1]))
    return np.concatenate(out)


def win_rate_interval(wins: np.ndarray, per_prompt: int, seed: int, draws: int = 2000) -> dict:
    """95% bootstrap interval of the mean of ``wins`` (prompt-major), resampling whole prompts."""
    by_prompt = wins.reshape(-1, per_prompt).mean(axis=1)
    rng = np.random.default_rng(seed)
    means = by_prompt[rng.integers(0, len(by_prompt), (draws, len(by_prompt)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"low": round(float(low), 4), "high": round(float(high), 4)}  # a dict: `dvc metrics` shows no lists


def win_rate_by_judge(wins: np.ndarray, production_aligned: np.ndarray, candidate_aligned: np.ndarray) -> dict:
    """The win rate on the pairs whose judge verdict improved, stayed or worsened."""
    change = candidate_aligned.astype(int) - production_aligned.astype(int)
    return {name: {"pairs": int((change == d).sum()),
                   "win_rate": round(float(wins[change == d].mean()), 4) if (change == d).any() else None}
            for name, d in (("improved", 1), ("unchanged", 0), ("worsened", -1))}


def judge_verdicts(images: np.ndarray, prompts: list[str]) -> list:
    from components.world.judge import judge

    return [judge(image, prompt) for image, prompt in zip(images, prompts)]


def judge_rates(verdicts: list) -> dict:
    from components.world.grammar import ATTRIBUTES

    rates = {"aligned": float(np.mean([v.aligned for v in verdicts]))}
    rates.update({a: float(np.mean([getattr(v, a) for v in verdicts])) for a in ATTRIBUTES})
    return {k: round(v, 4) for k, v in rates.items()}


def training_images(project: Project, gens: pd.DataFrame) -> np.ndarray:
    """The images the fine-tune learned from: every labelled generation (memorization reference)."""
    ids: set[str] = set()
    if project.path(feedback.TASKS).exists():
        tasks = pd.read_parquet(project.path(feedback.TASKS))
        ids = {g for group in tasks["generation_ids"] for g in group} & set(gens.index)
    keys = list(gens.loc[sorted(ids), "image_key"])
    return feedback.Fetcher(project.object_store()).images(keys)


def grid(production: np.ndarray, candidate: np.ndarray, per_prompt: int, rows: int, scale: int = 3) -> np.ndarray:
    """rows = prompts; per row: production's K images | gap | candidate's K images (same seeds)."""
    h, w = production.shape[1:3]
    pad = 4
    canvas = np.full(((h + pad) * rows, (w + pad) * (2 * per_prompt + 1), 3), 255, np.uint8)
    for r in range(rows):
        for k in range(per_prompt):
            for col, images in ((k, production), (per_prompt + 1 + k, candidate)):
                y, x = r * (h + pad), col * (w + pad)
                canvas[y:y + h, x:x + w] = images[r * per_prompt + k]
    return canvas.repeat(scale, axis=0).repeat(scale, axis=1)


def evaluate(project: Project) -> dict:
    import torch
    from PIL import Image

    params = project.params
    cfg = params.evaluation
    torch.set_num_threads(params.finetune.threads)
    candidate_dir = project.path(CANDIDATE)
    if not models.is_model_dir(candidate_dir):
        raise UserError(f"{CANDIDATE}: no candidate model; build it with `dvc repro finetune`")
    prompts = feedback.read_table(project.root, Path("data/prompts.parquet"), ["id", "text", "split", "category"],
                                  "run `dvc repro curate`")
    prompts = prompts[prompts["split"] == "eval"].sort_values("id")
    if cfg.max_prompts:
        prompts = prompts.head(cfg.max_prompts)
    if not len(prompts):
        raise UserError("data/prompts.parquet: no eval-split prompts to evaluate on")
    texts, ids, per = list(prompts["text"]), list(prompts["id"]), cfg.images_per_prompt
    config = SamplerConfig.from_params(params.sample)
    production_where = models.resolve(project, "production")
    images = {name: draw(models.on_accelerator(models.load_pipeline(where), params.sample.dtype), texts, ids, per,
                         params.seed, config)
              for name, where in (("production", production_where), ("candidate", candidate_dir))}
    expanded = [t for t in texts for _ in range(per)]

    metrics: dict = {"prompts": len(texts), "images_per_model": len(expanded),
                     "production": models.model_version(production_where),
                     "candidate": models.model_version(candidate_dir)}
    reward_path = project.path("models/reward")
    per_prompt = pd.DataFrame({"prompt_id": ids, "prompt": texts})
    if (reward_path / "config.json").exists():
        from components.reward.model import load_scorer

        scorer = load_scorer(project, reward_path)
        r = {name: scorer.score(imgs, expanded)[0] for name, imgs in images.items()}
        wins = np.where(r["candidate"] > r["production"], 1.0, np.where(r["candidate"] == r["production"], 0.5, 0.0))
        metrics["reward"] = {"production_mean": round(float(r["production"].mean()), 4),
                             "candidate_mean": round(float(r["candidate"].mean()), 4),
                             "gain": round(float(r["candidate"].mean() - r["production"].mean()), 4),
                             "win_rate": round(float(wins.mean()), 4),
                             "win_rate_interval": win_rate_interval(wins, per, params.seed)}
        per_prompt["reward_production"] = r["production"].reshape(-1, per).mean(axis=1).round(4)
        per_prompt["reward_candidate"] = r["candidate"].reshape(-1, per).mean(axis=1).round(4)
    if params.profile == "world":
        unseen = np.array([c == "world/unseen" for c in prompts["category"] for _ in range(per)])
        judge, aligned = {}, {}
        for name, imgs in images.items():
            verdicts = judge_verdicts(imgs, expanded)
            aligned[name] = np.array([v.aligned for v in verdicts])
            judge[name] = {"all": judge_rates(verdicts)}
            if unseen.any():
                judge[name]["held_out"] = judge_rates([v for v, u in zip(verdicts, unseen) if u])
        judge["gain"] = round(judge["candidate"]["all"]["aligned"] - judge["production"]["all"]["aligned"], 4)
        metrics["judge"] = judge
        if "reward" in metrics:
            metrics["reward"]["win_rate_by_judge"] = win_rate_by_judge(wins, aligned["production"],
                                                                       aligned["candidate"])
    div = {name: diversity(imgs, per) for name, imgs in images.items()}
    metrics["diversity"] = {"production": round(float(div["production"].mean()), 4),
                            "candidate": round(float(div["candidate"].mean()), 4)}
    metrics["diversity"]["drop"] = round(float(1 - div["candidate"].mean() / max(div["production"].mean(), 1e-8)), 4)
    metrics["drift"] = round(float(distance(images["candidate"], images["production"]).mean()), 4)
    gens = feedback.generations(project.root)
    nearest = nearest_distance(images["candidate"], training_images(project, gens))
    metrics["memorization"] = {"near_copy_rate": round(float((nearest < cfg.near_copy_distance).mean()), 4),
                               "min_distance": round(float(nearest.min()), 4) if np.isfinite(nearest).any() else None}
    per_prompt["diversity_production"], per_prompt["diversity_candidate"] = div["production"].round(4), \
        div["candidate"].round(4)

    out = project.path(METRICS_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    per_prompt.to_csv(project.path(PROMPTS_OUT), index=False)
    rows = min(len(texts), cfg.grid_prompts)
    Image.fromarray(grid(images["production"], images["candidate"], per, rows)).save(project.path(GRID_OUT))
    project.path(REPORT_OUT).write_text(markdown_report(metrics, texts[:rows]))
    return metrics


def markdown_report(metrics: dict, grid_prompts: list[str]) -> str:
    lines = ["# Evaluation: candidate vs production", "",
             f"{metrics['prompts']} held-out prompts × {metrics['images_per_model'] // metrics['prompts']} images per "
             f"model, same seeds. Production `{metrics['production']}`, candidate `{metrics['candidate']}`.", "",
             "| metric | production | candidate |", "|---|---|---|"]
    if "reward" in metrics:
        r = metrics["reward"]
        lines.append(f"| learned reward (mean) | {r['production_mean']} | {r['candidate_mean']} |")
        lo, hi = r["win_rate_interval"]["low"], r["win_rate_interval"]["high"]
        lines.append(f"| win rate over production (95% interval over prompts) | | {r['win_rate']} ({lo}–{hi}) |")
    if "judge" in metrics:
        j = metrics["judge"]
        for key in j["production"]["all"]:
            lines.append(f"| judge: {key} | {j['production']['all'][key]} | {j['candidate']['all'][key]} |")
        if "held_out" in j["production"]:
            lines.append(f"| judge: aligned on held-out compositions | {j['production']['held_out']['aligned']} | "
                         f"{j['candidate']['held_out']['aligned']} |")
    d = metrics["diversity"]
    lines += [f"| diversity | {d['production']} | {d['candidate']} |",
              f"| drift from production | | {metrics['drift']} |",
              f"| near-copies of training images | | {metrics['memorization']['near_copy_rate']} |", "",
              f"![production (left) vs candidate (right)]({GRID_OUT.name})", "",
              "Rows of the grid, top to bottom: " + "; ".join(grid_prompts), ""]
    split = metrics.get("reward", {}).get("win_rate_by_judge")
    if split:
        lines += ["Win rate by how the judge's verdict changed between a pair's images (same prompt and seed):", "",
                  "| judge verdict | pairs | candidate's win rate |", "|---|---|---|"]
        lines += [f"| {name} | {row['pairs']} | {row['win_rate'] if row['win_rate'] is not None else '–'} |"
                  for name, row in split.items()]
        lines.append("")
    return "\n".join(lines)


def _stage(project: Project) -> str:
    m = evaluate(project)
    judge = f", judge gain {m['judge']['gain']:+.3f}" if "judge" in m else ""
    reward = f"win rate {m['reward']['win_rate']:.2f}" if "reward" in m else "no reward model"
    return f"{reward}{judge}, diversity drop {m['diversity']['drop']:+.3f}; report {REPORT_OUT}"


def main() -> int:
    from components.stage import run_stage

    return run_stage("evaluate", _stage)


if __name__ == "__main__":
    sys.exit(main())
