"""The fine-tuning objectives, one LightningModule each (ALGORITHMS.md §1–§4).

Trajectory methods (D3PO, PRDP) score recorded DDIM (eta = 1) steps with
``sampling.step_log_prob`` — classifier-free guidance applied, log-density averaged
over dimensions, the sampler's conventions. ELBO methods (reward-weighted,
Diffusion-DPO) use ``core.denoising_mse`` at a random timestep.

Every module logs its diagnostics (loss; implicit accuracy for the DPO family; clip
fraction and approximate KL for PRDP; reward mean/std) for DVCLive's curves in
``reports/live/finetune``; ``grad_norm`` comes from :class:`PolicyModule`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from components.config import FinetuneParams
from components.finetune.core import PolicyModule, denoising_mse
from components.sampling import Conditioning, SamplerConfig, derive_seed, sample, step_log_prob, timestep_pairs


@dataclass
class TrajectoryPairs:
    """Labelled pairs over recorded trajectories. Each trajectory is stored (and, in a
    batch, run through the UNet) once, however many pairs it is in: an image of a group
    of K that share x_T can be in K − 1 pairs (D3PO trains all of them, §2.3)."""
    latents: torch.Tensor  # (N, T+1, C, H, W): x_T … x_0 of every trajectory in a pair
    cond: Conditioning  # (N, …) the prompts' conditioning recorded at sampling time
    uncond: Conditioning
    timesteps: torch.Tensor  # (T,)
    winner: torch.Tensor  # (P,) indices into latents
    loser: torch.Tensor

    @classmethod
    def of(cls, traj, winner, loser) -> TrajectoryPairs:
        """Pairs (winner[i], loser[i]) of the rows of one :class:`~components.sampling.Trajectories`."""
        return cls(latents=traj.latents, cond=traj.cond, uncond=traj.uncond,
                   timesteps=traj.timesteps, winner=torch.as_tensor(winner), loser=torch.as_tensor(loser))


def step_subset(steps: int, fraction: float, generator: torch.Generator) -> list[int]:
    """Which denoising steps a batch trains on (all when fraction = 1)."""
    n = max(1, math.ceil(fraction * steps))
    return sorted(torch.randperm(steps, generator=generator)[:n].tolist())


class D3PO(PolicyModule):
    """Per-step DPO on the recorded trajectories of labelled pairs (D3PO, §2).

    For every trained step i: ``−log σ(β·log r_w − β·log r_l)`` with the ratio
    ``r = π_θ/π_ref`` of that step clamped to [1−ε, 1+ε] (the reference code's trust
    region: outside the band the gradient is zero). At θ = ref the loss is log 2.
    Ties carry no preference and never become pairs. A batch holds pair indices; each
    trajectory in it is scored once per step, whatever the number of its pairs.
    Step-level pairs (``branch_step`` k: the two images differ only by step k's noise)
    train step k alone: their label says nothing about the other steps.
    """

    def __init__(self, pipe, cfg: FinetuneParams, seed: int, pairs: TrajectoryPairs, sampler: SamplerConfig,
                 branch_step: int | None = None):
        super().__init__(pipe, cfg, cfg.d3po.lr, seed)
        self.pairs, self.sampler, self.branch_step = pairs, sampler, branch_step
        _, self.prevs = timestep_pairs(pipe.scheduler, len(pairs.timesteps))

    def log_ratio(self, images: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Clamped per-step log-ratio log(π_θ/π_ref) of the given trajectories, and which
        were clamped (no gradient flows through those)."""
        p = self.pairs
        t, prev_t = int(p.timesteps[step]), int(self.prevs[step])
        args = (self.pipe.scheduler, p.latents[images, step], t, prev_t, p.latents[images, step + 1],
                p.cond[images], p.uncond[images], self.sampler)
        policy = step_log_prob(self.unet, *args)
        with self.reference_unet() as ref:
            reference = step_log_prob(ref, *args)
        eps = self.cfg.d3po.clip
        ratio = torch.exp(policy - reference)
        return torch.log(ratio.clamp(1 - eps, 1 + eps)), ((ratio < 1 - eps) | (ratio > 1 + eps)).detach()

    def pair_logits(self, pairs: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """β·(log r_w − log r_l) of the given pairs at one step, and which of their
        trajectories' ratios were clamped at that step."""
        p = self.pairs
        images, where = torch.unique(torch.cat([p.winner[pairs], p.loser[pairs]]), return_inverse=True)
        ratio, clamped = self.log_ratio(images, step)
        winner, loser = where.chunk(2)
        return self.cfg.d3po.beta * (ratio[winner] - ratio[loser]), clamped

    def training_step(self, batch, batch_idx):
        pairs = self.batch_index(batch_idx)
        steps = [self.branch_step] if self.branch_step is not None else \
            step_subset(len(self.pairs.timesteps), self.cfg.d3po.timestep_fraction, self.generator("steps"))
        total, pairs = len(pairs), pairs[self.local_part(len(pairs))]
        self.record(pairs)
        if not len(pairs):
            return self.zero_loss()
        losses, correct, clamped = [], [], []
        for step in steps:
            logits, outside = self.pair_logits(pairs, step)
            losses.append(-F.logsigmoid(logits).mean())
            correct.append((logits > 0).float().mean())  # a pair clamped on both sides scores 0: not correct
            clamped.append(outside.float().mean())
        loss = torch.stack(losses).mean()
        self.log("loss", loss, prog_bar=True)
        self.log("implicit_accuracy", torch.stack(correct).mean())
        # the last steps' σ is tiny: a small drift there leaves the band and those steps stop teaching
        self.log("clamped_fraction", torch.stack(clamped).mean())
        return loss * self.share(len(pairs), total)


class PRDP(PolicyModule):
    """Proximal reward difference prediction (§4), online.

    Each epoch (``updates_per_epoch`` optimiser steps): sample B images for each of N
    prompts with the current policy (θ_old; its per-step log-probs are recorded), their
    reference log-probs, and rewards. The loss regresses the difference of trajectory
    log-ratios ``r̂ = mean_t log(π_θ/π_ref)`` between two images of a prompt onto their
    reward difference / β, over each unordered pair with different rewards once; per
    step the log-ratio is also clipped to ±ε around θ_old and the larger (pessimistic)
    of the clipped and unclipped losses is used. At θ = θ_old = ref the loss is
    ``mean((Δr/β)²)``.
    """

    def __init__(self, pipe, cfg: FinetuneParams, seed: int, prompts: list[str], reward_fn, sampler: SamplerConfig):
        super().__init__(pipe, cfg, cfg.prdp.lr, seed)
        self.prompts, self.reward_fn, self.sampler = prompts, reward_fn, sampler
        self.epoch_samples: dict | None = None
        self.sampled_epoch = -1
        _, self.prevs = timestep_pairs(pipe.scheduler, sampler.steps)

    def resample(self, epoch: int) -> None:
        c = self.cfg.prdp
        rng = np.random.default_rng([self.seed, epoch])
        chosen = rng.choice(len(self.prompts), size=min(c.prompts_per_epoch, len(self.prompts)), replace=False)
        part = self.local_part(len(chosen))  # under DDP, each process samples its share of the prompts
        chosen = chosen[part]
        self.record(chosen)
        prompts = [self.prompts[p] for p in chosen for _ in range(c.images_per_prompt)]
        first = part.start * c.images_per_prompt  # seeds by global image index: as one process draws them
        seeds = [derive_seed(self.seed, f"prdp:{epoch}:{first + i}") for i in range(len(prompts))]
        a = b = torch.zeros(0, dtype=torch.long)
        traj = reference = rewards = None
        if prompts:
            self.unet.eval()
            traj = sample(self.pipe, prompts, seeds, self.sampler)
            reference = torch.zeros_like(traj.log_probs)
            with self.reference_unet() as ref:
                for step, (t, prev_t) in enumerate(zip(traj.timesteps.tolist(), self.prevs.tolist())):
                    reference[:, step] = step_log_prob(ref, self.pipe.scheduler, traj.latents[:, step], t, prev_t,
                                                       traj.latents[:, step + 1], traj.cond, traj.uncond,
                                                       self.sampler)
            self.unet.train()
            rewards = torch.as_tensor(self.reward_fn(traj.images, prompts), dtype=torch.float32)
            group = torch.arange(len(chosen)).repeat_interleave(c.images_per_prompt)
            a, b = torch.triu_indices(len(prompts), len(prompts), offset=1)
            keep = (group[a] == group[b]) & (rewards[a] != rewards[b])
            a, b = a[keep], b[keep]
            swap = rewards[a] < rewards[b]  # order each pair so that Δr > 0
            a, b = torch.where(swap, b, a), torch.where(swap, a, b)
        total = len(a)
        if self._trainer and self.trainer.world_size > 1:
            total = int(self.trainer.strategy.reduce(torch.tensor(float(len(a)), device=self.device), reduce_op="sum"))
        self.epoch_samples = {"traj": traj, "ref": reference, "rewards": rewards, "a": a, "b": b, "pairs": total}
        self.sampled_epoch = epoch

    def training_step(self, batch, batch_idx):
        epoch = self.global_step // self.cfg.prdp.updates_per_epoch
        if epoch != self.sampled_epoch:
            self.resample(epoch)
        s = self.epoch_samples
        if not len(s["a"]):  # no prompt here, or every image of a prompt scored the same: nothing to learn
            loss = self.zero_loss()
            self.log("loss", loss, prog_bar=True)
            return loss
        loss, stats = self.prdp_loss(s, step_subset(self.sampler.steps, self.cfg.prdp.timestep_fraction,
                                                    self.generator("steps")))
        self.log("loss", loss, prog_bar=True)
        self.log("reward_mean", s["rewards"].mean(), prog_bar=True)
        self.log("reward_std", s["rewards"].std())
        for name, value in stats.items():
            self.log(name, value)
        return loss * self.share(len(s["a"]), s["pairs"])

    def prdp_loss(self, s: dict, steps: list[int]) -> tuple[torch.Tensor, dict]:
        traj, c = s["traj"], self.cfg.prdp

        def policy_step(i: int) -> torch.Tensor:
            return step_log_prob(self.unet, self.pipe.scheduler, traj.latents[:, i], int(traj.timesteps[i]),
                                 int(self.prevs[i]), traj.latents[:, i + 1], traj.cond, traj.uncond,
                                 self.sampler)

        # The squared pair loss couples every step of every image, so without checkpointing the
        # backward pass holds the UNet activations of all of them at once (the defaults, 128
        # images × 10 steps, need more than 24 GiB); this way it holds one step's.
        policy = torch.stack([checkpoint(policy_step, i, use_reentrant=False) for i in steps], dim=1)
        device = policy.device  # the samples were recorded on the CPU
        reference, old = s["ref"][:, steps].to(device), traj.log_probs[:, steps].to(device)
        ratio, old_ratio = policy - reference, old - reference
        clipped = torch.maximum(torch.minimum(ratio, old_ratio + c.clip), old_ratio - c.clip)
        target = ((s["rewards"][s["a"]] - s["rewards"][s["b"]]) / c.beta).to(device)

        def pair_loss(r):
            r_hat = r.mean(dim=1)
            return (r_hat[s["a"]] - r_hat[s["b"]] - target) ** 2

        loss = torch.maximum(pair_loss(ratio), pair_loss(clipped)).mean()
        drift = (policy - old).detach()
        return loss, {"clip_fraction": (drift.abs() > c.clip).float().mean(),
                      "approx_kl": 0.5 * (drift ** 2).mean()}


class RewardWeighted(PolicyModule):
    """Reward-weighted likelihood (Lee et al. §1.4): ``mean_i w_i·mse_i + β_pre·mse(prior batch)``.

    ``weights`` are the human label (or the learned reward above its threshold) of each
    model generation; ``prior_batch(step)`` returns (x0, prompt embeddings) drawn from the
    pre-training distribution, which keeps the model from forgetting.
    """

    def __init__(self, pipe, cfg: FinetuneParams, seed: int, x0: torch.Tensor, cond: Conditioning,
                 weights: torch.Tensor, prior_batch):
        super().__init__(pipe, cfg, cfg.reward_weighted.lr, seed)
        self.x0, self.cond, self.weights, self.prior_batch = x0, cond, weights, prior_batch

    def random_mse(self, x0: torch.Tensor, cond: Conditioning, stream: str, part: slice = slice(None)
                   ) -> torch.Tensor:
        """The denoising MSE of ``x0[part]``, at the timesteps and noise drawn for all of x0."""
        g = self.generator(stream)
        t = torch.randint(0, len(self.pipe.scheduler.alphas_cumprod), (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        return denoising_mse(self.unet, self.pipe.scheduler, x0[part], cond[part], t[part], noise[part])

    def training_step(self, batch, batch_idx):
        index = self.batch_index(batch_idx)
        part = self.local_part(len(index))
        self.record(index[part])
        if not len(index[part]):
            return self.zero_loss()
        # The weights are 0/1 (a label, or the learned reward over its threshold) and only the
        # good are kept: the weighted mean is a mean, which `share` spreads over processes.
        w = self.weights[index[part]].to(self.device)
        feedback = (w * self.random_mse(self.x0[index], self.cond[index], "feedback", part)).sum() / w.sum()
        loss, shared = feedback, feedback * self.share(len(w), len(index))
        if self.cfg.reward_weighted.pretrain_weight:  # the same prior batch on every process: its mean as is
            prior_x0, prior_cond = self.prior_batch(self.global_step)
            prior = self.cfg.reward_weighted.pretrain_weight * self.random_mse(prior_x0, prior_cond, "prior").mean()
            loss, shared = loss + prior, shared + prior
            self.log("prior_mse", prior / self.cfg.reward_weighted.pretrain_weight)
        self.log("loss", loss, prog_bar=True)
        self.log("weighted_mse", feedback)
        self.log("reward_mean", w.mean())
        return shared


class DiffusionDPO(PolicyModule):
    """Diffusion-DPO (§3): winner and loser noised with the same t and ε;

    ``−log σ(β·[(mse_ref^w − mse_ref^l) − (mse_θ^w − mse_θ^l)])`` with β = 2500 (≡ 5000 in
    the paper's 0.5·β form). Implicit accuracy: the share of pairs with a positive inner term.
    """

    def __init__(self, pipe, cfg: FinetuneParams, seed: int, winner: torch.Tensor, loser: torch.Tensor,
                 cond: Conditioning):
        super().__init__(pipe, cfg, cfg.diffusion_dpo.lr, seed)
        self.winner, self.loser, self.cond = winner, loser, cond

    def training_step(self, batch, batch_idx):
        index = self.batch_index(batch_idx)
        g = self.generator("dpo")  # t and ε drawn for the global batch, then this process's share
        t = torch.randint(0, len(self.pipe.scheduler.alphas_cumprod), (len(index),), generator=g)
        noise = torch.randn(self.winner[index].shape, generator=g)
        part = self.local_part(len(index))
        total, index, t, noise = len(index), index[part], t[part].repeat(2), noise[part].repeat(2, 1, 1, 1)
        self.record(index)
        if not len(index):
            return self.zero_loss()
        x0 = torch.cat([self.winner[index], self.loser[index]])
        cond = self.cond[index].repeat(2)
        mse_w, mse_l = denoising_mse(self.unet, self.pipe.scheduler, x0, cond, t, noise).chunk(2)
        with self.reference_unet() as ref:
            ref_w, ref_l = denoising_mse(ref, self.pipe.scheduler, x0, cond, t, noise).chunk(2)
        inner = (ref_w - ref_l) - (mse_w - mse_l)
        loss = -F.logsigmoid(self.cfg.diffusion_dpo.beta * inner).mean()
        self.log("loss", loss, prog_bar=True)
        self.log("implicit_accuracy", (inner > 0).float().mean())
        return loss * self.share(len(index), total)
