"""The world profile's text-to-image model: Stable Diffusion in miniature, every part trained here.

Three parts, each its own stage and output, as in SD:

- a KL autoencoder (``AutoencoderKL``, 32×32×3 images ↔ 8×8×4 latents): ``models/vae``;
- a CLIP (``CLIPModel``: a word-level text tower over the world vocabulary and a small
  ViT), trained contrastively on noisily captioned renders: ``models/clip``. Its text
  tower is the pipeline's frozen text encoder; both towers are the frozen encoder under
  the reward heads (``components/reward/model.py``), as Lee et al. put heads on CLIP;
- a latent ``UNet2DConditionModel`` over the VAE's latents, conditioned on the text
  tower: the ``pretrain`` stage's ``models/base``, a stock ``StableDiffusionPipeline``.

So the world and the sd15 profile run the same code and differ only in weights and params.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, PreTrainedTokenizerFast

from components.config import WorldClipParams, WorldParams, WorldUnetParams, WorldVaeParams
from components.world.grammar import vocabulary
from components.world.render import IMAGE_SIZE

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
MAX_TOKENS = 12  # bos + the longest prompt (7 words) + eos, with room to spare
LATENT_CHANNELS = 4


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>", model_max_length=MAX_TOKENS)


def build_scheduler() -> DDIMScheduler:
    # squaredcos suits small latents; "trailing" spacing starts sampling at t=999 even
    # with few steps. There ᾱ ≈ 2e-9, so an ε-model cannot recover the image's global
    # colour (x0 = (x - √(1-ᾱ)ε)/√ᾱ amplifies errors 20,000×): v-prediction is well
    # conditioned at every noise level. Latents are unbounded, so x0 is not clipped.
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                         set_alpha_to_one=False, timestep_spacing="trailing", prediction_type="v_prediction")


def build_vae(cfg: WorldVaeParams) -> AutoencoderKL:
    levels = len(cfg.channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=IMAGE_SIZE,
                         block_out_channels=tuple(cfg.channels), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels)


def latent_size(vae: AutoencoderKL) -> int:
    return IMAGE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1)


def build_clip(cfg: WorldClipParams, tokenizer: PreTrainedTokenizerFast) -> CLIPModel:
    width = cfg.width
    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)  # CLIP pools the text at its eos token
    vision = dict(image_size=IMAGE_SIZE, patch_size=cfg.patch_size, hidden_size=width, intermediate_size=2 * width,
                  num_hidden_layers=cfg.vision_layers, num_attention_heads=4)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=width))


def image_processor():
    """CLIP's input for 32×32 renders: no resize or crop, pixels scaled to [-1, 1]."""
    from transformers import CLIPImageProcessorPil  # Pil: no torchvision needed

    return CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)


def text_encoder_of(clip: CLIPModel) -> CLIPTextModel:
    """CLIP's text tower as the standalone ``CLIPTextModel`` a Stable Diffusion pipeline loads."""
    encoder = CLIPTextModel(clip.config.text_config)
    encoder.load_state_dict(clip.text_model.state_dict())
    return encoder.requires_grad_(False).eval()


def build_unet(cfg: WorldUnetParams, latent: int, text_dim: int) -> UNet2DConditionModel:
    depth = len(cfg.channels)
    return UNet2DConditionModel(
        sample_size=latent, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * depth, up_block_types=("CrossAttnUpBlock2D",) * depth,
        cross_attention_dim=text_dim, attention_head_dim=8, norm_num_groups=8,
        # An attention-pooled prompt embedding added to the timestep embedding conditions
        # every ResNet block globally: background and count are global properties.
        addition_embed_type="text", addition_embed_type_num_heads=4)


def assemble(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: PreTrainedTokenizerFast,
             unet: UNet2DConditionModel):
    """The parts as a stock ``StableDiffusionPipeline``."""
    from diffusers import StableDiffusionPipeline  # its import logs transformers' torchvision notes: see stage.py

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def untrained(cfg: WorldParams, seed: int = 0) -> tuple:
    """(pipeline, CLIP) of the configured architecture with random weights: for tests, and
    for benchmarks of costs, which do not depend on the weights."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vae, clip = build_vae(cfg.vae), build_clip(cfg.clip, tokenizer)
    unet = build_unet(cfg.unet, latent_size(vae), cfg.clip.width)
    return assemble(vae, text_encoder_of(clip), tokenizer, unet), clip


def save_clip(clip: CLIPModel, tokenizer: PreTrainedTokenizerFast, where) -> None:
    """Model, tokenizer and image processor: what ``load_clip`` (and transformers) read back."""
    clip.save_pretrained(where)
    tokenizer.save_pretrained(where)
    image_processor().save_pretrained(where)
