"""The trajectory sampler shared by generation and the trajectory-based trainers.

DDIM with eta (1.0 = DDPM-like, so every step has a finite Gaussian density) and
classifier-free guidance. It records x_T…x_0, the timesteps, the prompt embeddings
and the per-step log-prob of the *guided* step. Conventions (as in the public
DDPO/D3PO code): the log-prob is the Gaussian log-density averaged over the
sample's dimensions; the step math is exactly ``DDIMScheduler.step`` (including
x0 clipping when the scheduler clips).

Every sample has its own seeds (one for x_T, one for the step noise), so a sample
does not depend on which batch it was drawn in (up to float rounding of batched
kernels; stages keep batch boundaries fixed, so re-runs are bit-identical), and two
images can share x_T (as D3PO needs) while their step noise differs.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 20
    guidance_scale: float = 3.0
    eta: float = 1.0

    @classmethod
    def from_params(cls, sample) -> SamplerConfig:
        """From params.yaml's ``sample`` section (its dtype is where the model runs, not the math)."""
        return cls(steps=sample.steps, guidance_scale=sample.guidance_scale, eta=sample.eta)

    def as_dict(self) -> dict:
        return {"sampler": "ddim", "steps": self.steps, "guidance_scale": self.guidance_scale, "eta": self.eta}


@dataclass
class Conditioning:
    """What the UNet is conditioned on, one row per sample: the text encoder's hidden
    states and, for SDXL, the pooled text embedding and the size/crop ``time_ids``
    (the UNet's ``added_cond_kwargs``). Indexes, concatenates and moves as one tensor."""
    embeds: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor | None = None  # (B, P)
    time_ids: torch.Tensor | None = None  # (B, 6)

    FIELDS = ("embeds", "pooled", "time_ids")

    def _map(self, fn) -> Conditioning:
        return Conditioning(*(None if (v := getattr(self, f)) is None else fn(v) for f in self.FIELDS))

    def __len__(self) -> int:
        return len(self.embeds)

    def __getitem__(self, index) -> Conditioning:
        return self._map(lambda v: v[index])

    def to(self, device=None, dtype=None) -> Conditioning:
        return self._map(lambda v: v.to(device=device, dtype=dtype))

    def repeat(self, n: int) -> Conditioning:
        return Conditioning.cat([self] * n)

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        return Conditioning(*(None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts])
                              for f in Conditioning.FIELDS))

    @staticmethod
    def stack(rows: list[Conditioning]) -> Conditioning:
        """Rows of one sample each (no batch dimension) → a batch."""
        return Conditioning(*(None if getattr(rows[0], f) is None else torch.stack([getattr(r, f) for r in rows])
                              for f in Conditioning.FIELDS))

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Named tensors for a safetensors file (``prefix`` = "prompt" or "negative")."""
        return {f"{prefix}_{f}": v.contiguous() for f in self.FIELDS if (v := getattr(self, f)) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> Conditioning:
        return cls(*(tensors.get(f"{prefix}_{f}") for f in cls.FIELDS))


@dataclass
class Trajectories:
    latents: torch.Tensor  # (B, T+1, C, H, W): x_T … x_0
    timesteps: torch.Tensor  # (T,)
    log_probs: torch.Tensor  # (B, T): log p(x_{t-1} | x_t, c) under the sampling model
    cond: Conditioning  # the prompts'
    uncond: Conditioning  # the empty prompt's (classifier-free guidance)
    images: np.ndarray  # (B, H, W, 3) uint8


def derive_seed(seed: int, stream: str) -> int:
    """An independent 63-bit seed for one named random stream of a sample."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{stream}".encode()).digest()[:8], "big") >> 1


# ---- model adapters: Stable Diffusion 1.5 (the world's too) and XL ------------------

def is_sdxl(pipe) -> bool:
    """The UNet takes pooled text embeddings and size/crop ids besides the hidden states."""
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def encode_prompts(pipe, prompts: list[str]) -> tuple[Conditioning, Conditioning]:
    """(conditional, unconditional) conditioning of the prompts."""
    if is_sdxl(pipe):
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompts, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=True)
        # (original size, crop top-left, target size): the full image, uncropped, as SDXL samples by default
        height, width = (s * pipe.vae_scale_factor for s in sample_shape(pipe)[1:])
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond.dtype,
                                device=cond.device).repeat(len(prompts), 1)
        return Conditioning(cond, pooled, time_ids), Conditioning(uncond, uncond_pooled, time_ids.clone())
    cond, uncond = pipe.encode_prompt(prompts, device=pipe.device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=True)
    return Conditioning(cond), Conditioning(uncond)


def sample_shape(pipe) -> tuple[int, int, int]:
    cfg = pipe.unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return (cfg.in_channels, size, size)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float (B, 3, H, W) in [-1, 1], the VAE's input."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[-1, 1] float (B, 3, H, W) → uint8 (B, H, W, 3)."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_images(pipe, latents: torch.Tensor) -> np.ndarray:
    """Decoded uint8 images (B, H, W, 3) of final latents."""
    return to_uint8(pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample.float())


# ---- the math -------------------------------------------------------------------

def timestep_pairs(scheduler, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling timesteps and each one's predecessor (-1 = the final step)."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.clone()
    prev = timesteps - scheduler.config.num_train_timesteps // steps
    return timesteps, prev


def guided_output(unet, x: torch.Tensor, t: torch.Tensor | int, cond: Conditioning, uncond: Conditioning,
                  guidance_scale: float) -> torch.Tensor:
    """Classifier-free-guided model output (ε, v or x0, whatever the model predicts)."""
    both = Conditioning.cat([uncond, cond]).to(dtype=unet.dtype)
    out = unet(torch.cat([x, x]), t, **both.unet_kwargs()).sample
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def predictions(scheduler, model_output: torch.Tensor, x_t: torch.Tensor, alpha_t: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, ε) implied by the model output, for the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    a, b = alpha_t.sqrt(), (1 - alpha_t).sqrt()
    if kind == "epsilon":
        return (x_t - b * model_output) / a, model_output
    if kind == "v_prediction":
        return a * x_t - b * model_output, a * model_output + b * x_t
    if kind == "sample":
        return model_output, (x_t - a * model_output) / b
    raise ValueError(f"unsupported prediction_type {kind!r}")


def ddim_step(scheduler, model_output: torch.Tensor, t: int, prev_t: int, x_t: torch.Tensor, eta: float,
              noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step; returns (x_{t-1}, log-prob per sample).

    Give ``noise`` to sample x_{t-1}, or ``prev_sample`` to score a recorded one.
    """
    alphas = scheduler.alphas_cumprod.to(x_t.device, torch.float32)
    alpha_t = alphas[t]
    alpha_prev = alphas[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod.to(x_t.device, torch.float32)
    beta_t = 1 - alpha_t
    x_t = x_t.float()
    pred_x0, eps = predictions(scheduler, model_output.float(), x_t, alpha_t)
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        pred_x0 = pred_x0.clamp(-limit, limit)
    variance = (1 - alpha_prev) / beta_t * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    mean = alpha_prev.sqrt() * pred_x0 + (1 - alpha_prev - std**2).sqrt() * eps
    if prev_sample is None:
        if std > 0 and noise is None:
            raise ValueError("ddim_step needs noise to sample when eta > 0")
        prev_sample = mean + std * noise if std > 0 else mean
    if std == 0:
        return prev_sample, torch.zeros(x_t.shape[0], device=x_t.device)
    log_prob = (-((prev_sample.detach().float() - mean) ** 2) / (2 * std**2)
                - torch.log(std) - 0.5 * math.log(2 * math.pi))
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def step_log_prob(pipe_or_unet, scheduler, x_t: torch.Tensor, t: int, prev_t: int, x_prev: torch.Tensor,
                  cond: Conditioning, uncond: Conditioning, config: SamplerConfig) -> torch.Tensor:
    """Log-prob of a recorded step under a (possibly different) model; differentiable."""
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    device = unet.device  # recorded trajectories live on the CPU; the model may not
    x_t, x_prev = x_t.to(device), x_prev.to(device)
    out = guided_output(unet, x_t, t, cond.to(device), uncond.to(device), config.guidance_scale)
    return ddim_step(scheduler, out, t, prev_t, x_t, config.eta, prev_sample=x_prev)[1]


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], config: SamplerConfig, init_seeds: list[int] | None = None,
           record: bool = True, branch_step: int | None = None, branch_seeds: list[int] | None = None
           ) -> Trajectories:
    """Sample one image per (prompt, seed); ``init_seeds`` (default: the seeds) choose x_T.

    With ``branch_step`` k, step k's noise comes from ``branch_seeds`` instead of the
    seeds: samples with equal init_seeds and seeds but different branch seeds share x_T
    and every step's noise but step k's, so they differ only by what step k drew
    (step-level pairs).
    """
    init_seeds = init_seeds if init_seeds is not None else seeds
    if (branch_step is None) != (branch_seeds is None):
        raise ValueError("branch_step and branch_seeds go together")
    device, dtype = pipe.device, pipe.unet.dtype
    shape = sample_shape(pipe)
    cond, uncond = encode_prompts(pipe, prompts)
    x = torch.stack([
        torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(s, "x_T"))) for s in init_seeds
    ]).to(device) * scheduler_init_sigma(pipe.scheduler)
    step_rngs = [torch.Generator().manual_seed(derive_seed(s, "steps")) for s in seeds]
    timesteps, prevs = timestep_pairs(pipe.scheduler, config.steps)
    latents, log_probs = [x], []
    for step, (t, prev_t) in enumerate(zip(timesteps.tolist(), prevs.tolist())):
        out = guided_output(pipe.unet, x.to(dtype), t, cond, uncond, config.guidance_scale)
        noise = torch.stack([torch.randn(shape, generator=g) for g in step_rngs]).to(device)
        if step == branch_step:  # the step rngs still advance: later steps stay shared
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(s, "branch")))
                                 for s in branch_seeds]).to(device)
        x, log_prob = ddim_step(pipe.scheduler, out, t, prev_t, x, config.eta, noise=noise)
        if record:
            latents.append(x)
            log_probs.append(log_prob)
    images = to_images(pipe, x)
    if not record:
        return Trajectories(latents=x[:, None], timesteps=timesteps, log_probs=torch.empty(len(prompts), 0),
                            cond=cond, uncond=uncond, images=images)
    return Trajectories(latents=torch.stack(latents, dim=1).cpu(), timesteps=timesteps,
                        log_probs=torch.stack(log_probs, dim=1).cpu(), cond=cond.to("cpu", torch.float32),
                        uncond=uncond.to("cpu", torch.float32), images=images)


def scheduler_init_sigma(scheduler) -> float:
    return float(getattr(scheduler, "init_noise_sigma", 1.0))
