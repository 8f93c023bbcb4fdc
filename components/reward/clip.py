"""The reward of the sd15/sdxl profiles: heads on a frozen CLIP (Lee et al. 2023).

``r(x, c)`` is an MLP over the normalised CLIP image and text embeddings (and their
product, the cosine similarity's terms). CLIP stays frozen; only the heads train, so
the saved model is just the heads (``ClipRewardHead``: config + safetensors). CLIP
itself comes from ``models.clip`` in params.yaml — a local directory or a hub repo at a
pinned 40-hex revision, loaded with ``local_files_only`` — and the heads' config
records which CLIP they were trained on, so scoring with another one is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from components.errors import UserError
from components.reward.model import RewardScorer


class ClipRewardHead(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, embed_dim: int = 768, width: int = 256, heads: int = 3, clip: str = ""):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3 * embed_dim, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
        self.out = nn.Linear(width, heads)

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Per-head logits (B, heads) from L2-normalised CLIP embeddings."""
        return self.out(self.mlp(torch.cat([image_embeds, text_embeds, image_embeds * text_embeds], dim=1)))


def _projected(features) -> torch.Tensor:
    """The projected embedding: transformers 5 returns it as the output's pooler_output."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def load_clip(where: Path | str):
    """(CLIPModel, CLIPTokenizer, CLIPImageProcessor) from a directory or ``repo_id@revision``."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer  # Pil: no torchvision needed

    if isinstance(where, Path):
        kwargs, name = {}, str(where)
    else:
        name, revision = where.split("@", 1)
        kwargs = {"revision": revision, "local_files_only": True}
    try:
        return (CLIPModel.from_pretrained(name, **kwargs).requires_grad_(False).eval(),
                CLIPTokenizer.from_pretrained(name, **kwargs), CLIPImageProcessorPil.from_pretrained(name, **kwargs))
    except OSError as exc:
        raise UserError(f"models.clip: cannot load CLIP from {where} ({str(exc).splitlines()[0]})") from None


class ClipRewardScorer(RewardScorer):
    """Scores uint8 images against prompts: frozen CLIP embeddings → the trained heads."""

    def __init__(self, model: ClipRewardHead, clip_source: Path | str, clip_parts=None):
        self.model = model.eval()
        self.clip, self.tokenizer, processor = clip_parts or load_clip(clip_source)
        self.size = self.clip.config.vision_config.image_size
        self.mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std).view(1, 3, 1, 1)

    @classmethod
    def create(cls, clip_source: Path | str, heads: int) -> ClipRewardScorer:
        parts = load_clip(clip_source)
        head = ClipRewardHead(embed_dim=parts[0].config.projection_dim, heads=heads, clip=str(clip_source))
        return cls(head, clip_source, parts)

    @classmethod
    def load(cls, path: Path, clip_source: Path | str) -> ClipRewardScorer:
        model = ClipRewardHead.from_pretrained(path)
        if model.config.clip != str(clip_source):
            raise UserError(f"{path}: trained on CLIP {model.config.clip}, but models.clip is now {clip_source}; "
                            "retrain it with `dvc repro train_reward`")
        return cls(model, clip_source)

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) → CLIP's normalised input (N, 3, S, S)."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
        return (x.clamp(0, 1) - self.mean) / self.std

    def logits(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():  # CLIP is frozen: only the heads learn
            tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
            text = F.normalize(_projected(self.clip.get_text_features(**tokens)), dim=-1)
            image = F.normalize(_projected(self.clip.get_image_features(pixel_values=pixels)), dim=-1)
        return self.model(image, text)
