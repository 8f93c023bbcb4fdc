"""Which text-to-image pipeline a stage uses, and a stable version string for it.

- world profile: ``models/base`` (built by the ``pretrain`` stage), a ``StableDiffusionPipeline``;
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


_RESTORE = "restore it from git (`git checkout -- models/`)"


def production_pointer(project: Project) -> dict:
    pointer = project.path(PRODUCTION_POINTER)
    return read_json(pointer, _RESTORE, ("model",)) if pointer.exists() else {"model": "base"}


def registered(project: Project) -> list[dict]:
    """Every promoted version, oldest first (``models/registry.json``)."""
    registry = project.path(REGISTRY)
    return read_json(registry, _RESTORE, ("versions",))["versions"] if registry.exists() else []


def resolve(project: Project, name: str = "base") -> Path | str:
    """A local model directory, or ``repo_id@revision`` for a pinned hub checkpoint."""
    if name == "production":
        name = production_pointer(project)["model"]
    if name.startswith(TAG_PREFIX):
        versions = registered(project)
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


def quiet_model_io() -> None:
    """No "Loading pipeline components…", "Loading weights" or "Writing model shards" bars:
    on every load and save they say nothing the stage's own lines do not."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_pipeline(where: Path | str, dtype=None):
    import logging

    import torch
    from diffusers import DiffusionPipeline

    quiet_model_io()
    logging.getLogger("diffusers.loaders.lora_base").addFilter(_not_the_text_encoder_lora_note)  # added once
    dtype = dtype or torch.float32
    if isinstance(where, str):
        repo_id, revision = where.split("@", 1)
        try:
            index = DiffusionPipeline.load_config(repo_id, revision=revision, local_files_only=True)
            pipe = DiffusionPipeline.from_pretrained(repo_id, revision=revision, local_files_only=True, dtype=dtype,
                                                     **_no_safety_checker(index))
        except OSError as exc:
            raise UserError(f"{repo_id}@{revision} is not in the local Hugging Face cache ({exc}); "
                            "download it once on a connected machine or set models.<profile>.path") from None
        check_components(pipe, where)
        return pipe
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
    for name, spec in index.items():  # [library, class] per component; [null, null] = left out
        if not name.startswith("_") and isinstance(spec, list) and spec[0] and not (where / name).is_dir():
            raise UserError(f"{where}: the pipeline's {name} ({spec[1]}) is missing: expected the folder "
                            f"{where / name}")
    try:
        pipe = DiffusionPipeline.from_pretrained(where, local_files_only=True, dtype=dtype, **_no_safety_checker(index))
    except (OSError, ValueError, RuntimeError) as exc:  # safetensors' errors are OSError or RuntimeError kinds
        raise UserError(f"{where}: cannot load the pipeline ({_first_line(exc)}); rebuild it or point at "
                        "another model") from None
    check_components(pipe, where)
    return pipe


def _no_safety_checker(index: dict) -> dict:
    """SD1.5 checkpoints carry a safety checker we never run; SDXL's pipeline has none to refuse."""
    return {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_components(pipe, where: Path | str) -> None:
    """Components that load but do not fit together (from different checkpoints) fail here,
    in one line, instead of as a shape error inside the first UNet call."""
    unet = pipe.unet.config
    parts = [("text_encoder", getattr(pipe, "text_encoder", None)), ("text_encoder_2", getattr(pipe, "text_encoder_2", None))]
    encoders = [(name, enc) for name, enc in parts if enc is not None]
    width = sum(enc.config.hidden_size for _, enc in encoders)
    if unet.cross_attention_dim != width:
        names = " + ".join(f"{name} ({enc.config.hidden_size})" for name, enc in encoders)
        raise UserError(f"{where}: unet attends to {unet.cross_attention_dim}-wide text states, but {names} "
                        f"give {width}: the components come from different models")
    vae = pipe.vae
    if vae.config.latent_channels != unet.in_channels:
        raise UserError(f"{where}: unet takes {unet.in_channels} latent channels, but vae makes "
                        f"{vae.config.latent_channels}: the components come from different models")
    if unet.addition_embed_type == "text_time":
        pooled = pipe.text_encoder_2.config.projection_dim
        expected = pipe.unet.add_embedding.linear_1.in_features - 6 * unet.addition_time_embed_dim
        if pooled != expected:
            raise UserError(f"{where}: unet expects {expected}-wide pooled text embeddings, but text_encoder_2 "
                            f"projects to {pooled}: the components come from different models")


def on_accelerator(pipe, dtype: str = "float32"):
    """The pipeline on the GPU when there is one, in ``dtype``; on CPU it stays float32."""
    import torch

    if torch.cuda.is_available():
        return pipe.to("cuda", dtype=getattr(torch, dtype))
    return pipe


def version_of(project: Project, name: str = "production") -> str:
    """A model's version as generations, candidates and the registry record it.

    A promoted model is known by its registered version, whether it is loaded fused
    (``models/production``) or as its adapter (``models/registry/vN``); any other model
    by the content hash of its directory.
    """
    if name == "production":
        pointer = production_pointer(project)
        if pointer.get("model_version"):
            return pointer["model_version"]
        name = pointer["model"]
    where = resolve(project, name)
    for version in registered(project):
        same_directory = isinstance(where, Path) and where.resolve() == project.path(version["path"]).resolve()
        if name == version["tag"] or same_directory:
            return version["model_version"]
    return model_version(where)


def lineage(project: Project) -> list[str]:
    """The models production descends from, oldest first, production last: ``base`` and
    every promoted version up to production's (``policy@vN``)."""
    current = production_pointer(project).get("model_version")
    if not current:
        return ["base"]
    versions = registered(project)
    upto = next((i for i, v in enumerate(versions) if v["model_version"] == current), None)
    return ["base", *([v["tag"] for v in versions[:upto + 1]] if upto is not None else ["production"])]


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
