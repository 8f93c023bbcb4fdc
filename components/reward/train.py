"""`train_reward` stage: a reward model from the label snapshot (Lightning).

- ``reward.kind: lee`` (Lee et al. 2023): binary majorities y ∈ {0, 1};
  ``L = MSE(y, r(x, c)) + λ · L_pc`` where, for every image labelled good, the model must
  pick its own prompt among it and N−1 perturbed prompts (count, colour, shape or
  background changed by the world grammar): ``softmax_j r(x, c_j) / T``. The original
  prompt is scored by the same network as the perturbations (an unofficial
  reimplementation feeds a constant there, so only the perturbations learn).
- ``reward.kind: bradley_terry``: ``−log σ(logit(x_w, c) − logit(x_l, c))`` on preference pairs,
  plus 0.01 · (logit_w + logit_l)², which centres the logits (pairs fix only their
  differences; left free they drift until the sigmoid saturates).

The heads sit on a frozen CLIP (``model.py``): the world's own (``models/clip``) or, for
sd15/sdxl, the one of ``models.clip``. The prompt-classification term needs the world
grammar to perturb a prompt, so elsewhere it applies to world prompts only.

Labelled prompts are split (seeded) into train and validation; metrics on the
validation prompts (accuracy, AUC, calibration error) and, in the world profile,
against the judge on the generations of every prompt the reward never saw.
Outputs: ``models/reward`` (safetensors + config), ``reports/reward_metrics.json``, the
training curves in ``reports/live/train_reward`` (DVCLive).
Run as a stage: ``python -m components.reward.train``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from components import feedback, live
from components.config import Params, RewardParams
from components.errors import UserError
from components.progress import on_terminal, progress_callbacks
from components.reward.model import ClipRewardScorer
from components.world.grammar import parse_prompt

MODEL_OUT = Path("models/reward")
METRICS_OUT = Path("reports/reward_metrics.json")


def perturbed_prompts(prompt: str, n: int, rng: np.random.Generator) -> list[str] | None:
    """n prompts that differ from ``prompt`` in one attribute; None outside the world grammar."""
    comp = parse_prompt(prompt)
    if comp is None:
        return None
    options = comp.perturbations()
    return [options[i].prompt for i in rng.choice(len(options), size=min(n, len(options)), replace=False)]


BT_CENTRING = 0.01  # weight of the squared pair-mean logit in the Bradley-Terry loss


class RewardModule(L.LightningModule):
    """The losses; the data lives in memory (a few thousand 32×32 images)."""

    def __init__(self, scorer: ClipRewardScorer, cfg: RewardParams, seed: int, images: torch.Tensor, prompts: list[str],
                 labels: torch.Tensor | None = None, pairs: np.ndarray | None = None):
        super().__init__()
        self.scorer, self.model, self.cfg, self.seed = scorer, scorer.model, cfg, seed
        self.images, self.prompts, self.labels, self.pairs = images, prompts, labels, pairs

    def bootstrap(self, n: int, step: int) -> torch.Tensor:
        """Poisson(1) weights per (example, head): each head sees its own resample."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        heads = self.model.config.heads
        return torch.ones(n, 1) if heads == 1 else torch.poisson(torch.ones(n, heads), generator=g)

    def training_step(self, index: torch.Tensor, batch_idx):
        index = index.tolist()
        weights = self.bootstrap(len(index), self.global_step)
        if self.cfg.kind == "bradley_terry":
            w, l = self.pairs[index, 0].tolist(), self.pairs[index, 1].tolist()
            prompts = [self.prompts[i] for i in w]
            winner, loser = self.scorer.logits(self.images[w], prompts), self.scorer.logits(self.images[l], prompts)
            margin = winner - loser
            # Pairs fix only differences: without centring the logits drift until the
            # sigmoid saturates (74% of a first round's images scored exactly 1.0).
            centring = BT_CENTRING * (winner + loser) ** 2
            loss = (weights * (centring - F.logsigmoid(margin))).sum() / weights.sum()
            self.log("accuracy", (margin.mean(dim=1) > 0).float().mean())
            self.log("loss", loss, prog_bar=True)
            return loss
        prompts = [self.prompts[i] for i in index]
        y = self.labels[index]
        reward = torch.sigmoid(self.scorer.logits(self.images[index], prompts))
        mse = (weights * (reward - y[:, None]) ** 2).sum() / weights.sum()
        loss = mse + self.cfg.prompt_classification_weight * self.prompt_classification(index, y, weights)
        self.log("mse", mse)
        self.log("loss", loss, prog_bar=True)
        return loss

    def prompt_classification(self, index: list[int], y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """−log P(original prompt | x, {original, perturbed}) over images labelled good."""
        rng = np.random.default_rng([self.seed, self.global_step])
        rows, candidates = [], []
        for row, i in enumerate(index):
            if y[row] < 0.5:
                continue
            others = perturbed_prompts(self.prompts[i], self.cfg.perturbed_prompts, rng)
            if others:
                rows.append(row)
                candidates.append([self.prompts[i], *others])  # the original prompt first
        if not rows:
            return torch.zeros(())
        n = min(len(c) for c in candidates)
        flat = [p for c in candidates for p in c[:n]]
        images = self.images[[index[r] for r in rows]].repeat_interleave(n, dim=0)
        reward = torch.sigmoid(self.scorer.logits(images, flat)).view(len(rows), n, -1)  # (B, N, heads)
        nll = -torch.log_softmax(reward / self.cfg.temperature, dim=1)[:, 0, :]
        w = weights[rows]
        return (w * nll).sum() / w.sum()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=1e-4)


# ---- metrics -----------------------------------------------------------------------

def auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann–Whitney U with average ranks); None with one class only."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    ranks = pd.Series(scores).rank().to_numpy()
    return round(float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)), 4)


def calibration_error(scores: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: |mean score − rate of good| per score bin, weighted by bin size."""
    which = np.minimum((scores * bins).astype(int), bins - 1)
    error = sum(abs(scores[which == b].mean() - labels[which == b].mean()) * (which == b).sum()
                for b in range(bins) if (which == b).any())
    return round(float(error / len(scores)), 4)


def binary_metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    if not len(scores):
        return {"n": 0}
    return {"n": int(len(scores)), "accuracy": round(float(((scores >= 0.5) == (labels >= 0.5)).mean()), 4),
            "auc": auc(scores, labels >= 0.5), "calibration_error": calibration_error(scores, labels)}


# ---- the stage ---------------------------------------------------------------------

def split_prompts(prompts: list[str], fraction: float, seed: int) -> set[str]:
    """The labelled prompts held out for validation (at least one when there are two or more)."""
    unique = sorted(set(prompts))
    rng = np.random.default_rng([seed, 7])
    n = min(len(unique) - 1, max(1, round(fraction * len(unique)))) if len(unique) > 1 else 0
    return {unique[i] for i in rng.choice(len(unique), size=n, replace=False)}


def train_reward(params: Params, root: Path, store) -> dict:
    cfg = params.reward
    torch.set_num_threads(cfg.threads)
    L.seed_everything(params.seed, verbose=False)
    gens = feedback.generations(root)
    fetch = feedback.Fetcher(store)

    if cfg.kind == "lee":
        table = feedback.binary_labels(root, gens)
        needed = "binary labels (good and bad)"
        usable = table["label"].nunique() == 2
    else:
        table = feedback.preference_pairs(root, gens)
        needed = "preference pairs"
        usable = len(table) > 0
    if len(table) < 2 or not usable:
        raise UserError(f"{feedback.TASKS if cfg.kind == 'lee' else feedback.PREFERENCES}: "
                        f"{len(table)} usable rows; reward.kind {cfg.kind} needs {needed} for at least two prompts")
    validation = split_prompts(list(table["prompt"]), cfg.validation_fraction, params.seed)
    train_rows, val_rows = table[~table["prompt"].isin(validation)], table[table["prompt"].isin(validation)]

    ids = sorted(set(gens.index))
    position = {g: i for i, g in enumerate(ids)}
    images_u8 = fetch.images([gens.at[g, "image_key"] for g in ids])
    scorer = ClipRewardScorer.create(params, root, cfg.ensemble)
    images, prompts = scorer.prepare(images_u8), [gens.at[g, "prompt"] for g in ids]
    if cfg.kind == "lee":
        index = np.array([position[g] for g in train_rows["generation_id"]])
        labels = torch.zeros(len(ids))
        labels[index] = torch.from_numpy(train_rows["label"].to_numpy(copy=True))  # pandas hands out read-only arrays
        module = RewardModule(scorer, cfg, params.seed, images, prompts, labels=labels)
        samples = index
    else:
        pairs = np.array([[position[w], position[l]] for w, l in zip(train_rows["winner"], train_rows["loser"])])
        module = RewardModule(scorer, cfg, params.seed, images, prompts, pairs=pairs)
        samples = np.arange(len(pairs))

    samples = samples.tolist()
    sampler = torch.utils.data.RandomSampler(samples, replacement=True, num_samples=cfg.steps * cfg.batch_size,
                                             generator=torch.Generator().manual_seed(params.seed))
    loader = torch.utils.data.DataLoader(samples, batch_size=cfg.batch_size, sampler=sampler)
    trainer = L.Trainer(max_steps=cfg.steps, accelerator="cpu", devices=1, deterministic=True,
                        logger=live.StageLogger(root, "train_reward", resuming=False), log_every_n_steps=1,
                        callbacks=progress_callbacks("train_reward"), enable_progress_bar=on_terminal(),
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, loader)
    scorer.model.eval()

    metrics = evaluate_reward(scorer, cfg.kind, train_rows, val_rows, gens, position, images_u8, params)
    out, tmp = root / MODEL_OUT, root / MODEL_OUT.with_name("reward.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    scorer.model.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (root / METRICS_OUT).parent.mkdir(parents=True, exist_ok=True)
    (root / METRICS_OUT).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def evaluate_reward(scorer: ClipRewardScorer, kind: str, train_rows: pd.DataFrame, val_rows: pd.DataFrame,
                    gens: pd.DataFrame, position: dict, images_u8: np.ndarray, params: Params) -> dict:
    ids = list(position)
    scores, spread = scorer.score(images_u8, [gens.at[g, "prompt"] for g in ids])
    metrics: dict = {"kind": kind, "train_rows": int(len(train_rows)), "validation_rows": int(len(val_rows)),
                     "ensemble": scorer.model.config.heads, "mean_disagreement": round(float(spread.mean()), 4)}
    if kind == "lee":
        at = [position[g] for g in val_rows["generation_id"]]
        metrics["validation"] = binary_metrics(scores[at], val_rows["label"].to_numpy())
    else:
        w = scores[[position[g] for g in val_rows["winner"]]]
        lo = scores[[position[g] for g in val_rows["loser"]]]
        right = np.where(w > lo, 1.0, np.where(w == lo, 0.5, 0.0))  # a tie counts half, as in the win rate
        metrics["validation"] = {"n": int(len(val_rows)),
                                 "pair_accuracy": round(float(right.mean()), 4) if len(val_rows) else None,
                                 "tied": round(float((w == lo).mean()), 4) if len(val_rows) else None}
    if params.profile == "world":
        from components.world.judge import judge

        trained_on = set(train_rows["prompt"])
        unseen = [i for i, g in enumerate(ids) if gens.at[g, "prompt"] not in trained_on]
        verdicts = np.array([judge(images_u8[i], gens.at[ids[i], "prompt"]).aligned for i in unseen], dtype=float)
        metrics["judge_on_unseen_prompts"] = binary_metrics(scores[unseen], verdicts)
    return metrics


def _stage(project) -> str:
    metrics = train_reward(project.params, project.root, project.object_store())
    val = metrics["validation"]
    return f"{metrics['kind']} reward: validation {json.dumps(val)}"


def main() -> int:
    from components.stage import run_stage

    return run_stage("train_reward", _stage)


if __name__ == "__main__":
    sys.exit(main())
