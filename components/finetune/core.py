"""What every fine-tuning method shares: the policy (LoRA or full), its frozen reference,
the ELBO denoising loss, and saving/loading a candidate model.

The trajectory log-prob primitive lives in :mod:`components.sampling` (``step_log_prob``),
the same code that recorded the trajectories.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import torch

from components.config import FinetuneParams, LoraParams
from components.sampling import Conditioning, to_pixels

LORA_FILE = "pytorch_lora_weights.safetensors"
CANDIDATE_FILE = "candidate.json"


def attach_policy(pipe, lora: LoraParams) -> torch.nn.Module | None:
    """Make the UNet trainable: a LoRA adapter (rank > 0) or all weights (rank 0).

    Returns the frozen reference UNet for a full fine-tune; with LoRA the reference is
    the same UNet with its adapter disabled (no second copy in memory).
    """
    for frozen in ("text_encoder", "text_encoder_2", "vae"):
        if getattr(pipe, frozen, None) is not None:
            getattr(pipe, frozen).requires_grad_(False)
    if lora.rank == 0:
        import copy

        reference = copy.deepcopy(pipe.unet).requires_grad_(False).eval()
        pipe.unet.requires_grad_(True).train()
        return reference
    from peft import LoraConfig

    pipe.unet.requires_grad_(False).train()
    pipe.unet.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, init_lora_weights="gaussian",
                                     target_modules=list(lora.target_modules)))
    return None


class PolicyModule(L.LightningModule):
    """Base of every method: holds the policy, the reference and the optimiser.

    Under data parallelism (``strategy: ddp``, N processes) every process draws the same
    global batch from the schedule and trains on its own contiguous share of it
    (:meth:`local_part`), so the processes never see the same example in a step and x_T
    groups stay together. Each scales its mean loss by its share (:meth:`share`), so that
    DDP's average of the gradients is the gradient of the mean over the global batch:
    N processes train the model one process would, at the same global batch.
    """

    def __init__(self, pipe, cfg: FinetuneParams, lr: float, seed: int):
        super().__init__()
        self.pipe, self.unet, self.cfg, self.lr, self.seed = pipe, pipe.unet, cfg, lr, seed
        self.reference = attach_policy(pipe, cfg.lora)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.schedule: list[np.ndarray] = []
        self.seen: list[tuple[int, int]] = []  # (micro-batch, example) this process trained on

    def batch_index(self, batch_idx: int) -> torch.Tensor:
        """The examples of this micro-batch: a pure function of the step, so a resumed run
        sees exactly the batches an uninterrupted one would."""
        accumulate = self.trainer.accumulate_grad_batches if self._trainer else 1
        micro = self.global_step * accumulate + batch_idx % accumulate
        return torch.as_tensor(self.schedule[micro % len(self.schedule)])

    def ranks(self) -> tuple[int, int]:
        """(this process's rank, number of processes)."""
        return (self.trainer.global_rank, self.trainer.world_size) if self._trainer else (0, 1)

    def local_part(self, n: int) -> slice:
        """This process's contiguous share of a global batch of n examples (all of it alone)."""
        rank, world = self.ranks()
        sizes = [n // world + (r < n % world) for r in range(world)]
        start = sum(sizes[:rank])
        return slice(start, start + sizes[rank])

    def share(self, local: int, total: int) -> float:
        """Scale of a mean over ``local`` of ``total`` examples such that the processes'
        averaged gradients are those of the mean over all of them."""
        return local * self.ranks()[1] / total if total else 0.0

    def record(self, examples) -> None:
        micro = self.global_step * (self.trainer.accumulate_grad_batches if self._trainer else 1)
        self.seen += [(micro, int(e)) for e in examples]

    def zero_loss(self) -> torch.Tensor:
        """A loss of 0 that still reaches every trainable weight: a process with no example
        in this batch must still take part in the gradient average."""
        return sum(p.sum() * 0 for p in self.trainable())

    @contextmanager
    def reference_unet(self):
        """The frozen reference model, gradients off."""
        with torch.no_grad():
            if self.reference is not None:
                yield self.reference
                return
            self.unet.disable_adapters()
            try:
                yield self.unet
            finally:
                self.unet.enable_adapters()

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.trainable(), lr=self.lr, betas=(0.9, 0.999), weight_decay=1e-4)

    def on_before_optimizer_step(self, optimizer):
        norms = [p.grad.detach().norm() for p in self.trainable() if p.grad is not None]
        if norms:
            self.log("grad_norm", torch.stack(norms).norm())

    def generator(self, stream: str) -> torch.Generator:
        from components.sampling import derive_seed

        return torch.Generator().manual_seed(derive_seed(self.seed, f"{stream}:{self.global_step}"))

    # Only the trainable weights go into checkpoints: the frozen base is rebuilt from disk.
    def on_save_checkpoint(self, checkpoint):
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}

    def on_load_checkpoint(self, checkpoint):
        self.load_state_dict(checkpoint["state_dict"], strict=False)
        checkpoint["state_dict"] = self.state_dict()


def denoising_mse(unet, scheduler, x0: torch.Tensor, cond: Conditioning, t: torch.Tensor, noise: torch.Tensor
                  ) -> torch.Tensor:
    """Per-sample MSE of the model's prediction target (ε, v or x0) at timesteps t: the ELBO surrogate."""
    device = unet.device  # training data lives on the CPU; the model may not
    x0, cond, t, noise = x0.to(device), cond.to(device), t.to(device), noise.to(device)
    alpha = scheduler.alphas_cumprod.to(device, torch.float32)[t].view(-1, 1, 1, 1)
    x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    kind = scheduler.config.prediction_type
    target = {"epsilon": noise, "v_prediction": alpha.sqrt() * noise - (1 - alpha).sqrt() * x0, "sample": x0}[kind]
    pred = unet(x_t.to(unet.dtype), t, **cond.to(dtype=unet.dtype).unet_kwargs()).sample.float()
    return ((pred - target) ** 2).mean(dim=tuple(range(1, pred.ndim)))


@torch.no_grad()
def encode_images(pipe, images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) → the model's x0 space: scaled VAE latents."""
    vae = pipe.vae
    latents = vae.encode(to_pixels(images).to(pipe.device, vae.dtype)).latent_dist.mean
    return latents.float() * vae.config.scaling_factor


@torch.no_grad()
def encode_text(pipe, prompts: list[str]) -> Conditioning:
    from components.sampling import encode_prompts

    return encode_prompts(pipe, prompts)[0]


# ---- candidate models on disk ------------------------------------------------------

def save_candidate(pipe, out: Path, lora: LoraParams, base: str, description: dict) -> None:
    """LoRA: diffusers-format adapter (``pipe.load_lora_weights(out)``) + candidate.json naming
    the base it applies to; full fine-tune: the whole pipeline. Written to a temporary
    directory and renamed, so a crash leaves no half-written model."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if lora.rank:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        tmp.mkdir(parents=True)
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
        type(pipe).save_lora_weights(tmp, unet_lora_layers=layers)
    else:
        pipe.save_pretrained(tmp)
    (tmp / CANDIDATE_FILE).write_text(json.dumps({"base": base, "lora": bool(lora.rank), **description},
                                                 indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
