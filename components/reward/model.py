"""The learned reward r(x, c) ∈ [0, 1]: heads on a frozen CLIP (Lee et al. 2023).

``r(x, c)`` is an MLP over the normalised CLIP image and text embeddings (and their
product, the cosine similarity's terms). CLIP stays frozen; only the heads train, so
the saved model is just the heads (``ClipRewardHead``: config-first, ``save_pretrained``
/ ``from_pretrained``). The world profile's CLIP is its own (``models/clip``, built by
``pretrain_clip``); sd15/sdxl use ``models.clip`` in params.yaml — a local directory or a
hub repo at a pinned 40-hex revision, loaded with ``local_files_only``. The heads'
config records which CLIP they were trained on, so scoring with another one is refused.

Ensemble: ``heads`` independent outputs, each trained on its own bootstrap weighting of
every batch, so their spread is a disagreement signal (active selection uses it).
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

WORLD_CLIP = Path("models/clip")


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


def embed_text(clip, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised CLIP text embeddings."""
    return F.normalize(_projected(clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)), dim=-1)


def embed_images(clip, pixels: torch.Tensor) -> torch.Tensor:
    """L2-normalised CLIP image embeddings of CLIP-normalised pixels."""
    return F.normalize(_projected(clip.get_image_features(pixel_values=pixels)), dim=-1)


def load_clip(where: Path | str):
    """(CLIPModel, tokenizer, CLIPImageProcessor) from a directory or ``repo_id@revision``."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel  # Pil: no torchvision needed

    if isinstance(where, Path):
        kwargs, name = {}, str(where)
    else:
        name, revision = where.split("@", 1)
        kwargs = {"revision": revision, "local_files_only": True}
    try:
        return (CLIPModel.from_pretrained(name, **kwargs).requires_grad_(False).eval(),
                AutoTokenizer.from_pretrained(name, **kwargs), CLIPImageProcessorPil.from_pretrained(name, **kwargs))
    except OSError as exc:
        raise UserError(f"models.clip: cannot load CLIP from {where} ({str(exc).splitlines()[0]})") from None


class ClipRewardScorer:
    """Scores uint8 images against prompts: frozen CLIP embeddings → the trained heads."""

    def __init__(self, model: ClipRewardHead, clip_source: Path | str, clip_parts=None):
        self.model = model.eval()
        self.clip, self.tokenizer, processor = clip_parts or load_clip(clip_source)
        self.size = self.clip.config.vision_config.image_size
        self.mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std).view(1, 3, 1, 1)

    @classmethod
    def create(cls, params, root: Path, heads: int) -> ClipRewardScorer:
        source, name = clip_source(params, root)
        parts = load_clip(source)
        head = ClipRewardHead(embed_dim=parts[0].config.projection_dim, heads=heads, clip=name)
        return cls(head, source, parts)

    @classmethod
    def load(cls, path: Path, params, root: Path) -> ClipRewardScorer:
        from components.files import read_json

        source, name = clip_source(params, root)
        config = read_json(path / "config.json", "rebuild it with `dvc repro train_reward`")
        if config.get("_class_name") != ClipRewardHead.__name__:  # e.g. the world's CNN reward of earlier versions
            raise UserError(f"{path}: not a reward model of this version (a {config.get('_class_name')}, expected "
                            f"{ClipRewardHead.__name__}); rebuild it with `dvc repro train_reward`")
        if config.get("clip") != name:
            raise UserError(f"{path}: trained on CLIP {config.get('clip')}, but models.clip is now {name}; "
                            "retrain it with `dvc repro train_reward`")
        try:
            model = ClipRewardHead.from_pretrained(path)
        except (OSError, ValueError, RuntimeError) as exc:  # safetensors' errors are OSError or RuntimeError kinds
            raise UserError(f"{path}: cannot load the reward heads ({_first_line(exc)}); "
                            "rebuild them with `dvc repro train_reward`") from None
        return cls(model, source)

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) → CLIP's normalised input (N, 3, S, S)."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
        return (x.clamp(0, 1) - self.mean) / self.std

    def logits(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():  # CLIP is frozen: only the heads learn
            tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
            text = embed_text(self.clip, tokens.input_ids, tokens.attention_mask)
            image = embed_images(self.clip, pixels)
        return self.model(image, text)

    @torch.no_grad()
    def head_rewards(self, images: np.ndarray, prompts: list[str], batch_size: int = 256) -> np.ndarray:
        """Every head's reward in [0, 1] per uint8 image: (N, heads)."""
        out = [torch.sigmoid(self.logits(self.prepare(images[start:start + batch_size]),
                                         prompts[start:start + batch_size]))
               for start in range(0, len(prompts), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.config.heads), np.float32)

    def score(self, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(mean reward, std across heads) per image."""
        rewards = self.head_rewards(images, prompts)
        spread = rewards.std(axis=1, ddof=1) if rewards.shape[1] > 1 else np.zeros(len(rewards), np.float32)
        return rewards.mean(axis=1), spread


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def clip_source(params, root: Path) -> tuple[Path | str, str]:
    """(where the reward's frozen CLIP loads from, the name its heads record): the world's
    own CLIP (the ``pretrain_clip`` stage's, recorded relative to the project, so a clone
    elsewhere builds the same model), else ``models.clip``."""
    if params.profile == "world":
        return Path(root) / WORLD_CLIP, str(WORLD_CLIP)
    where = params.models.clip.location(root)
    return where, str(where)


def load_scorer(project, path: Path) -> ClipRewardScorer:
    """The reward model trained at ``path``, on the CLIP the project's profile uses."""
    return ClipRewardScorer.load(path, project.params, project.root)
