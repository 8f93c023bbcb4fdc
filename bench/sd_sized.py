"""SD1.5- and SDXL-sized pipelines with random weights, built from their published
architecture numbers (no download): what the GPU benchmarks time, so that step times,
memory and FLOPs are those of the real models. The tokenizer is the tests' letter-level
CLIP tokenizer (a tiny vocabulary does not change the model's cost)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.models import _letter_tokenizer, _sd_scheduler

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768)
OPEN_CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                       max_position_embeddings=77, projection_dim=1280)
TIME_EMBED_DIM = 256


def _text_config(size: dict):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(_letter_tokenizer()), bos_token_id=0, eos_token_id=1, pad_token_id=1, **size)


def _vae(image_size: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         latent_channels=4, norm_num_groups=32, sample_size=image_size)


def save_sd_sized(profile: str, path: Path, image_size: int, seed: int = 0) -> Path:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    latent = image_size // 8
    if profile == "sd15":  # 860M-parameter UNet, CLIP ViT-L/14 text tower
        unet = UNet2DConditionModel(
            sample_size=latent, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
            attention_head_dim=8)
        pipe = StableDiffusionPipeline(vae=_vae(image_size), text_encoder=CLIPTextModel(_text_config(CLIP_L)),
                                       tokenizer=_letter_tokenizer(), unet=unet, scheduler=_sd_scheduler(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:  # 2.6B-parameter UNet, CLIP ViT-L + OpenCLIP bigG text towers
        unet = UNet2DConditionModel(
            sample_size=latent, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            cross_attention_dim=768 + 1280, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + 1280)
        pipe = StableDiffusionXLPipeline(
            vae=_vae(image_size), text_encoder=CLIPTextModel(_text_config(CLIP_L)),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(OPEN_CLIP_BIG_G)),
            tokenizer=_letter_tokenizer(), tokenizer_2=_letter_tokenizer(), unet=unet, scheduler=_sd_scheduler(),
            add_watermarker=False)
    pipe.save_pretrained(path)
    return path
