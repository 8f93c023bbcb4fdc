"""Learned reward r(x, c) ∈ [0, 1] of an image and its prompt, as a diffusers-style model.

Config-first (``ConfigMixin``): ``save_pretrained`` writes ``config.json`` and
``diffusion_pytorch_model.safetensors``; ``from_pretrained`` reads them back.

World encoders, trained here (the sd15/sdxl profiles put heads on a frozen CLIP
instead: ``components/reward/clip.py``): a small CNN over the 32×32 image, modulated (FiLM) by a
prompt encoder over the world's word-level tokens (word embeddings in their sentence
positions, so "two red" and "red two" differ), then global mean- and max-pooling (how
much of a colour is present) plus mean-pooling over a coarse ``layout_grid`` of regions
(where it is: counting needs it, since one large shape covers as much as two small
ones), and an MLP.

Ensemble: ``heads`` independent output heads on the shared trunk; each is trained on
its own bootstrap weighting of every batch, so their spread is a disagreement signal
(active selection uses it). ``forward`` returns per-head logits; ``score`` the mean
reward and the heads' standard deviation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class RewardModel(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, vocab_size: int = 32, max_tokens: int = 12, width: int = 64, word_dim: int = 32,
                 heads: int = 3, image_size: int = 32, layout_grid: int = 2):
        super().__init__()
        self.words = nn.Embedding(vocab_size, word_dim)
        self.positions = nn.Parameter(torch.zeros(max_tokens, word_dim))
        self.text = nn.Sequential(nn.Linear(max_tokens * word_dim, 2 * width), nn.GELU(), nn.Linear(2 * width, 2 * width))
        self.stem = nn.Sequential(nn.Conv2d(3, width // 2, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(width // 2, width, 3, padding=1, stride=2), nn.GELU())
        self.film = nn.Linear(2 * width, 2 * width)
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.GELU())
        self.layout = nn.AdaptiveAvgPool2d(layout_grid)
        self.mlp = nn.Sequential(nn.Linear((2 + layout_grid ** 2) * width + 2 * width, 2 * width), nn.GELU())
        self.out = nn.Linear(2 * width, heads)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        words = self.words(token_ids) + self.positions
        return self.text(words.flatten(1))

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Per-head logits (B, heads) for images in [-1, 1] (B, 3, H, W) and prompt token ids."""
        text = self.encode_text(token_ids)
        scale, shift = self.film(text).chunk(2, dim=1)
        features = self.stem(images) * (1 + scale[..., None, None]) + shift[..., None, None]
        features = self.body(features)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3)), self.layout(features).flatten(1),
                            text], dim=1)
        return self.out(self.mlp(pooled))


class RewardScorer:
    """Scores uint8 images against prompts with a trained reward model and the world tokenizer."""

    def __init__(self, model: RewardModel):
        from components.world.model import build_tokenizer

        self.model = model.eval()
        self.tokenizer = build_tokenizer()

    @classmethod
    def load(cls, path) -> RewardScorer:
        try:
            return cls(RewardModel.from_pretrained(path))
        except ValueError as e:  # weights of another architecture, e.g. saved before layout pooling
            from components.errors import UserError

            raise UserError(f"{path}: a reward model of an older architecture ({str(e).split(' If you')[0]}); "
                            "rebuild it with `dvc repro train_reward`") from None

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) → the model's input, (N, 3, H, W) in [-1, 1]."""
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1

    def logits(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per-head logits for prepared images."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.model.config.max_tokens,
                                truncation=True, return_tensors="pt").input_ids
        return self.model(pixels, tokens)

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


def load_scorer(project, path: Path) -> RewardScorer:
    """The reward model trained at ``path``: world heads, or heads on the CLIP of ``models.clip``."""
    import json

    if json.loads((path / "config.json").read_text()).get("_class_name") == "ClipRewardHead":
        from components.reward.clip import ClipRewardScorer

        return ClipRewardScorer.load(path, project.params.models.clip.location(project.root))
    return RewardScorer.load(path)

