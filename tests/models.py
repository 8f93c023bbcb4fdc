"""Tiny models built from configs, for tests: the world pipeline, Stable Diffusion 1.5 and XL, a CLIP."""

from __future__ import annotations

from pathlib import Path

import torch

from components.config import WorldClipParams, WorldUnetParams, WorldVaeParams

TINY_VAE = WorldVaeParams(channels=[16, 32, 32])
TINY_CLIP = WorldClipParams(width=32, text_layers=1, vision_layers=1, patch_size=8)
TINY_UNET = WorldUnetParams(channels=[16, 32])
TINY_WORLD = {"vae": TINY_VAE.model_dump(), "clip": TINY_CLIP.model_dump(), "unet": TINY_UNET.model_dump()}


def save_tiny_world_model(path: Path, seed: int = 0, clip_dir: Path | None = None) -> Path:
    """The world's Stable Diffusion in miniature, untrained and tinier still, at ``path``;
    with ``clip_dir``, also the CLIP whose text tower is its text encoder (the reward's encoder)."""
    from components.config import WorldParams
    from components.world import model

    pipe, clip = model.untrained(WorldParams(**TINY_WORLD), seed)
    with torch.no_grad():  # a zero output layer would make every image the same
        for param in pipe.unet.conv_out.parameters():
            param.normal_(0, 0.2)
    pipe.save_pretrained(path)
    if clip_dir is not None:
        model.save_clip(clip, pipe.tokenizer, clip_dir)
    return path


LETTERS = "abcdefghijklmnopqrstuvwxyz"
TINY_CLIP_TEXT = dict(vocab_size=2 + 2 * len(LETTERS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, max_position_embeddings=48, projection_dim=32, bos_token_id=0,
                      eos_token_id=1, pad_token_id=1)


def _letter_tokenizer():
    """A CLIP BPE tokenizer over single letters (no merges): real CLIP tokenization, tiny vocabulary."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in LETTERS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=48)


def save_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A CLIP (text and vision towers, tokenizer, image processor) as from_pretrained reads it."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(seed)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4)
    CLIPModel(CLIPConfig(text_config=TINY_CLIP_TEXT, vision_config=vision, projection_dim=16)).save_pretrained(path)
    _letter_tokenizer().save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _tiny_vae_and_latent_size(image_size: int):
    """A KL VAE, ×4 down-sampling at 32 px (tests), ×8 above (SD's real latent size)."""
    from diffusers import AutoencoderKL

    blocks = 3 if image_size <= 32 else 4
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32, 32, 32)[:blocks],
                        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                        latent_channels=4, norm_num_groups=8, sample_size=image_size)
    return vae, image_size // 2 ** (blocks - 1)


def _sd_scheduler():
    """Stable Diffusion's noise schedule (1.5 and XL share it)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def save_tiny_stable_diffusion(path: Path, seed: int = 0, image_size: int = 32) -> Path:
    """An SD1.5-shaped pipeline (latent UNet, KL VAE, CLIP text encoder + BPE tokenizer),
    tiny in width but at any resolution: image_size 32 → 4×8×8 latents (tests);
    512 → 4×64×64 (SD1.5's real latent size, for the GPU benchmark)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae, latent_size = _tiny_vae_and_latent_size(image_size)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT)),
                                   tokenizer=_letter_tokenizer(), unet=unet, scheduler=_sd_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


TIME_EMBED_DIM = 8  # per size/crop id: 6 ids


def save_tiny_sdxl(path: Path, seed: int = 0, image_size: int = 32) -> Path:
    """An SDXL-shaped pipeline, as diffusers' own tests build one: two text encoders (the
    second with a projection: the pooled embedding), a UNet with ``addition_embed_type``
    "text_time" conditioned on both encoders' hidden states, the pooled embedding and the
    six size/crop ids, and a KL VAE."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text = {**TINY_CLIP_TEXT, "num_hidden_layers": 2}  # SDXL reads the penultimate layer
    text_encoder, text_encoder_2 = CLIPTextModel(CLIPTextConfig(**text)), CLIPTextModelWithProjection(
        CLIPTextConfig(**text))
    vae, latent_size = _tiny_vae_and_latent_size(image_size)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=text["hidden_size"] * 2, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + text["projection_dim"], norm_num_groups=8)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=_letter_tokenizer(), tokenizer_2=_letter_tokenizer(), unet=unet,
                                     scheduler=_sd_scheduler(), add_watermarker=False)
    pipe.save_pretrained(path)
    return path
