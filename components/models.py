"""Which text-to-image pipeline a stage uses, and a stable version string for it.

- world profile: ``models/base`` (built by the ``pretrain`` stage), a ``WorldPipeline``;
- sd15 / sdxl: a diffusers checkpoint from a local directory, or a hub repo at a pinned
  40-hex revision, always loaded with ``local_files_only`` (no network at run time).

``production`` resolves through the registry's production pointer
(``models/production.json``: ``base`` until a model is promoted); ``policy@vN`` to that
registered version (``models/registry/vN``). A fine-tuned candidate is either a full
pipeline or a LoRA adapter with ``candidate.json`` naming the model it applies to
(relative to the candidate's directory); loading one loads its base and fuses the adapter.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from components.errors import UserError
from components.files import read_json
from components.project import Project

BASE_DIR = Path("models/base")
PRODUCTION_POINTER = Path("models/production.json")
REGISTRY = Path("models/registry.json")
TAG_PREFIX = "policy@v"


def resolve(project: Project, name: str = "base") -> Path | str:
    """A local model directory, or ``repo_id@revision`` for a pinned hub checkpoint."""
    if name == "production":
        pointer = project.path(PRODUCTION_POINTER)
        name = read_json(pointer, "restore it from git (`git checkout -- models/`)", ("model",))["model"] \
            if pointer.exists() else "base"
    if name.startswith(TAG_PREFIX):
        registry = project.path(REGISTRY)
        versions = read_json(registry, "restore it from git (`git checkout -- models/`)",
                             ("versions",))["versions"] if registry.exists() else []
        match = [v for v in versions if v["tag"] == name]
        if not match:
            known = ", ".join(v["tag"] for v in versions) or "none yet"
            raise UserError(f"{name}: no such registered model (registered: {known})")
        name = match[0]["path"]
    if name == "base":
        if project.params.profile == "world":
            path = project.path(BASE_DIR)
            if not (path / "model_index.json").exists():
                raise UserError(f"{path}: no base model yet; build it with `dvc repro pretrain`")
            return path
        return getattr(project.params.models, project.params.profile).location(project.root)
    path = project.path(name)
    if not is_model_dir(path):
        raise UserError(f"{name}: not a model: expected base, production or a diffusers directory "
                        "with model_index.json")
    return path


def is_model_dir(path: Path) -> bool:
    return (path / "model_index.json").exists() or (path / "candidate.json").exists()


def _not_the_text_encoder_lora_note(record) -> bool:
    """Our adapters train the UNet only: that the text encoder has no LoRA keys is expected."""
    return "No LoRA keys associated to" not in record.getMessage()


def load_pipeline(where: Path | str, dtype=None):
    import logging

    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from transformers.utils import logging as transformers_logging

    # "Loading pipeline components…" and "Loading weights" bars on every load say nothing
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    logging.getLogger("diffusers.loaders.lora_base").addFilter(_not_the_text_encoder_lora_note)  # added once
    dtype = dtype or torch.float32
    if isinstance(where, str):
        repo_id, revision = where.split("@", 1)
        try:
            return DiffusionPipeline.from_pretrained(repo_id, revision=revision, local_files_only=True,
                                                     dtype=dtype, safety_checker=None)
        except OSError as exc:
            raise UserError(f"{repo_id}@{revision} is not in the local Hugging Face cache ({exc}); "
                            "download it once on a connected machine or set models.<profile>.path") from None
    candidate = where / "candidate.json"
    if not (where / "model_index.json").exists() and candidate.exists():
        base = read_json(candidate, "rebuild the candidate with `dvc repro finetune`", ("base",))["base"]
        base_path = base if "@" in base else (where / base).resolve()
        pipe = load_pipeline(base_path, dtype)
        pipe.load_lora_weights(where)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        return pipe
    index = read_json(where / "model_index.json", "the model folder is damaged: rebuild it (`dvc repro`) "
                      "or point at another model")
    if index.get("_class_name") == "WorldPipeline":
        from components.world.model import WorldPipeline

        return WorldPipeline.from_pretrained(where, local_files_only=True, dtype=dtype)
    return DiffusionPipeline.from_pretrained(where, local_files_only=True, dtype=dtype, safety_checker=None,
                                             requires_safety_checker=False)


def on_accelerator(pipe, dtype: str = "float32"):
    """The pipeline on the GPU when there is one, in ``dtype``; on CPU it stays float32."""
    import torch

    if torch.cuda.is_available():
        return pipe.to("cuda", dtype=getattr(torch, dtype))
    return pipe


def model_version(where: Path | str) -> str:
    """Content hash of a model directory (weights hashed in full when small, else by size)."""
    if isinstance(where, str):
        return where
    digest = hashlib.sha256()
    for path in sorted(p for p in where.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(where)).encode())
        if path.stat().st_size <= 256 * 2**20:
            digest.update(path.read_bytes())
        else:
            digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()[:16]
