"""The world profile's text-to-image model: a real diffusers pipeline, small enough for CPU.

A pixel-space ``UNet2DConditionModel`` (32×32 RGB, no VAE) conditioned through
cross-attention on a tiny ``CLIPTextModel`` over a word-level tokenizer of the world
vocabulary. ``WorldPipeline`` round-trips with ``save_pretrained`` /
``from_pretrained`` offline and accepts LoRA weights through ``load_lora_weights``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from components.config import WorldModelParams
from components.world.grammar import vocabulary
from components.world.render import IMAGE_SIZE

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
MAX_TOKENS = 12  # bos + the longest prompt (7 words) + eos, with room to spare


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>", model_max_length=MAX_TOKENS)


def build_scheduler() -> DDIMScheduler:
    # squaredcos suits small images; "trailing" spacing starts sampling at t=999 even
    # with few steps. There ᾱ ≈ 2e-9, so an ε-model cannot recover the image's global
    # colour (x0 = (x - √(1-ᾱ)ε)/√ᾱ amplifies errors 20,000×): v-prediction is well
    # conditioned at every noise level. Clipping x0 keeps pixel samples in range.
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                         set_alpha_to_one=False, timestep_spacing="trailing", prediction_type="v_prediction")


def build_models(cfg: WorldModelParams, tokenizer: PreTrainedTokenizerFast) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_dim, intermediate_size=2 * cfg.text_dim,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        projection_dim=cfg.text_dim, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id))
    depth = len(cfg.channels)
    resolutions = [IMAGE_SIZE // 2**i for i in range(depth)]
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, block_out_channels=tuple(cfg.channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_dim, attention_head_dim=8, norm_num_groups=8,
        only_cross_attention=tuple(r > cfg.self_attention_max_resolution for r in resolutions),
        # An attention-pooled prompt embedding added to the timestep embedding conditions
        # every ResNet block globally: background and count are global properties.
        addition_embed_type="text", addition_embed_type_num_heads=4)
    return unet, text_encoder


class WorldPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Pixel-space text-to-image pipeline of the synthetic world."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                 tokenizer: PreTrainedTokenizerFast, scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @classmethod
    def from_config_params(cls, cfg: WorldModelParams, seed: int = 0) -> WorldPipeline:
        torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        unet, text_encoder = build_models(cfg, tokenizer)
        return cls(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=build_scheduler())

    @classmethod
    def trained_or_untrained(cls, path: Path, cfg: WorldModelParams) -> WorldPipeline:
        """The model saved at ``path``, else an untrained one of the configured architecture
        (for measuring costs, which do not depend on the weights)."""
        if (path / "model_index.json").exists():
            return cls.from_pretrained(path, local_files_only=True)
        return cls.from_config_params(cfg)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                              return_tensors="pt").input_ids.to(self.device)

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(self.tokenize(prompts)).last_hidden_state

    @staticmethod
    def to_images(x0: torch.Tensor) -> np.ndarray:
        """[-1, 1] float (B, 3, H, W) → uint8 (B, H, W, 3)."""
        return ((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    @staticmethod
    def from_images(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1

    @torch.no_grad()
    def __call__(self, prompts: list[str], num_inference_steps: int = 20, guidance_scale: float = 3.0,
                 eta: float = 1.0, seeds: list[int] | None = None) -> np.ndarray:
        from components.sampling import SamplerConfig, sample

        seeds = seeds if seeds is not None else list(range(len(prompts)))
        config = SamplerConfig(steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta)
        return sample(self, prompts, seeds, config, record=False).images
