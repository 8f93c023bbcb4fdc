"""Typed schema for params.yaml, the single surface of knobs.

Every section is a strict pydantic model: an unknown key, a wrong type or an
out-of-range value is reported as one line naming the key path
(``params.yaml: services.s3.port: expected ...``) via :class:`ParamsError`.
Paths in the file are relative to the directory holding params.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.errors import ParamsError

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


class _Strict(BaseModel):
    # strict: `true` is no integer and 1 no boolean; finite: a NaN threshold would pass every check
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _inside(value: str, key: str) -> str:
    """A relative path that stays inside the project (no absolute path, no `..`)."""
    parts = Path(value).parts
    if not value.strip() or Path(value).is_absolute() or ".." in parts:
        raise ValueError(f"{key} must be a relative path inside the project, got {value!r}")
    return value


def _cron(value: str | None, key: str) -> str | None:
    from datetime import datetime

    from cronsim import CronSim, CronSimError

    if value is not None:
        try:
            CronSim(value, datetime(2026, 1, 1))
        except (CronSimError, ValueError) as exc:
            raise ValueError(f"{key}: {value!r} is not a cron expression ({exc})") from None
    return value


def Port(default: int):  # noqa: N802 - reads like the Field it returns
    return Field(default, ge=1024, le=65535)


class S3Service(_Strict):
    embedded: bool = True
    port: int = Port(9100)
    # With embedded: false, the endpoint of an existing S3/MinIO service
    # (None = AWS itself). Credentials always come from the environment.
    endpoint_url: str | None = None
    region: str = "us-east-1"
    bucket: str = Field("aligndiff", pattern=r"^[a-z0-9][a-z0-9.-]{2,62}$")
    dvc_bucket: str = Field("aligndiff-dvc", pattern=r"^[a-z0-9][a-z0-9.-]{2,62}$")
    dvc_prefix: str = "store"

    @model_validator(mode="after")
    def _prefix_inside_bucket(self) -> S3Service:
        _inside(self.dvc_prefix, "dvc_prefix")
        return self


class PrefectService(_Strict):
    embedded: bool = True
    port: int = Port(4200)
    api_url: str | None = None  # with embedded: false, e.g. https://prefect.example.org/api


class LabelStudioService(_Strict):
    embedded: bool = True
    port: int = Port(8090)
    url: str | None = None  # with embedded: false
    # Label Studio projects are titled "<project_prefix>: <round kind>", so several
    # aligndiff projects can share one Label Studio server (titles: 50 characters at most).
    project_prefix: str = Field("aligndiff", min_length=1, max_length=32)
    # Label Studio pins packages that break Prefect, so it lives in its own venv.
    venv: str = ".aligndiff/venvs/label-studio"


class Services(_Strict):
    host: Literal["127.0.0.1", "localhost"] = "127.0.0.1"
    state_dir: str = ".aligndiff"
    startup_timeout_s: float = Field(300, gt=0, le=3600)
    s3: S3Service = S3Service()
    prefect: PrefectService = PrefectService()
    label_studio: LabelStudioService = LabelStudioService()

    @model_validator(mode="after")
    def _distinct_ports(self) -> Services:
        _inside(self.state_dir, "state_dir")
        ports = {"s3": self.s3.port, "prefect": self.prefect.port, "label_studio": self.label_studio.port}
        if len(set(ports.values())) != len(ports):
            raise ValueError(f"service ports must differ, got {ports}")
        for name, svc, url in (
            ("s3", self.s3, "endpoint_url"),
            ("prefect", self.prefect, "api_url"),
            ("label_studio", self.label_studio, "url"),
        ):
            if not svc.embedded and name != "s3" and not getattr(svc, url):
                raise ValueError(f"{name}.{url} is required when {name}.embedded is false")
        return self


class ModelSource(_Strict):
    """Where real weights come from: a local diffusers directory or a pinned hub revision."""

    path: str | None = None
    repo_id: str | None = None
    revision: str | None = None

    @model_validator(mode="after")
    def _pinned(self) -> ModelSource:
        if self.revision is not None and not _COMMIT_RE.match(self.revision):
            raise ValueError(f"revision must be a 40-character commit hash, got {self.revision!r}")
        return self

    def location(self, root: Path) -> Path | str:
        """The local directory (``path``, relative to ``root``) or ``repo_id@revision``."""
        return (Path(root) / self.path).resolve() if self.path else f"{self.repo_id}@{self.revision}"

    def resolvable(self) -> bool:
        return bool(self.path) or bool(self.repo_id and self.revision)


class Models(_Strict):
    sd15: ModelSource = ModelSource(repo_id="stable-diffusion-v1-5/stable-diffusion-v1-5")
    sdxl: ModelSource = ModelSource(repo_id="stabilityai/stable-diffusion-xl-base-1.0")
    clip: ModelSource = ModelSource(repo_id="openai/clip-vit-large-patch14")  # sd15/sdxl reward encoders


def _multiples_of_8(values: list[int], what: str) -> None:
    if any(v % 8 for v in values):
        raise ValueError(f"{what} must be multiples of 8 (group norm and attention heads)")


class WorldVaeParams(_Strict):
    # one ×2 down-sampling per level after the first: 3 levels → 32×32×3 images, 8×8×4 latents
    channels: list[int] = Field([16, 48, 48], min_length=2, max_length=4)

    @model_validator(mode="after")
    def _divisible(self) -> WorldVaeParams:
        _multiples_of_8(self.channels, "world.vae.channels")
        return self


class WorldClipParams(_Strict):
    width: int = Field(64, ge=8)  # both towers and the joint embedding
    text_layers: int = Field(2, ge=1, le=6)
    vision_layers: int = Field(3, ge=1, le=6)
    patch_size: int = Field(4, ge=1, le=32)  # 4 px patches: 64 image tokens at 32×32

    @model_validator(mode="after")
    def _divisible(self) -> WorldClipParams:
        _multiples_of_8([self.width], "world.clip.width")
        return self


class WorldUnetParams(_Strict):
    channels: list[int] = Field([64, 128], min_length=2, max_length=4)
    layers_per_block: int = Field(1, ge=1, le=3)

    @model_validator(mode="after")
    def _divisible(self) -> WorldUnetParams:
        _multiples_of_8(self.channels, "world.unet.channels")
        return self


class WorldParams(_Strict):
    # count×colour pairs ("two blue") never shown in pre-training: held-out
    # alignment on them measures generalisation.
    holdout: list[str] = ["two blue", "four red", "one yellow", "three green"]
    vae: WorldVaeParams = WorldVaeParams()
    clip: WorldClipParams = WorldClipParams()
    unet: WorldUnetParams = WorldUnetParams()

    @model_validator(mode="after")
    def _known_pairs(self) -> WorldParams:
        from components.world.grammar import COLOURS, COUNTS

        for pair in self.holdout:
            words = pair.split()
            if len(words) != 2 or words[0] not in COUNTS or words[1] not in COLOURS:
                raise ValueError(f"holdout entry {pair!r} must be '<count> <colour>' from the world vocabulary")
        return self


class CurateParams(_Strict):
    # "world" (the grammar) and/or paths of .txt/.csv/.jsonl prompt files (relative to the root)
    sources: list[str] = Field(["world"], min_length=1)
    eval_fraction: float = Field(0.25, ge=0, lt=1)
    min_chars: int = Field(3, ge=1)
    max_chars: int = Field(300, ge=1)
    max_line_chars: int = Field(4000, ge=1)
    blocklist: list[str] = []

    @model_validator(mode="after")
    def _bounds(self) -> CurateParams:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars {self.min_chars} is above max_chars {self.max_chars}")
        return self


class CaptionNoise(_Strict):
    count_off_by_one: float = Field(0.5, ge=0, le=1)
    wrong_background: float = Field(0.20, ge=0, le=1)


class PretrainVaeParams(_Strict):
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0, le=1)
    kl_weight: float = Field(1e-6, ge=0)  # as SD's VAE: a near-deterministic autoencoder, latents kept near N(0, σ²)
    edge_weight: float = Field(8.0, ge=1)  # L1 weight of shape edges, corners and the gaps between shapes
    judge_images: int = Field(1000, ge=1)  # fresh renders the judge checks after the round trip
    checkpoint_every: int = Field(100, ge=1)
    threads: int = Field(2, ge=1)


class PretrainClipParams(_Strict):
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0, le=1)
    checkpoint_every: int = Field(100, ge=1)
    threads: int = Field(2, ge=1)


class PretrainParams(_Strict):
    steps: int = Field(1200, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    ema_decay: float = Field(0.995, ge=0, lt=1)
    cfg_dropout: float = Field(0.1, ge=0, lt=1)
    min_snr_gamma: float = Field(5.0, gt=0)
    shape_weight: float = Field(8.0, ge=1)  # loss weight of the pixels where a square and a circle differ
    shape_weight_steps: int = Field(750, ge=0)  # steps that weight them; the rest train on the plain loss
    caption_noise: CaptionNoise = CaptionNoise()
    probe_every: int = Field(400, ge=1)  # steps between alignment probes (the training curve)
    probe_images_per_composition: int = Field(1, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    threads: int = Field(2, ge=1)


class SampleParams(_Strict):
    steps: int = Field(20, ge=1, le=1000)
    guidance_scale: float = Field(3.0, ge=1)  # classifier-free guidance; 1 = the conditional model alone
    eta: float = Field(1.0, ge=0, le=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # on a GPU; CPUs sample in float32


class EvaluateBaseParams(_Strict):
    # 4 × 96 = 384 images: enough to see a ≈5-point change in alignment
    images_per_composition: int = Field(4, ge=1)


class GenerateParams(_Strict):
    images_per_prompt: int = Field(4, ge=1)
    # images per prompt that share one initial noise x_T: 1 = independent, 2 = pairs (D3PO)
    shared_noise_group: int = Field(2, ge=1)
    # step-level pairs: a group shares x_T and every step's noise but step k's, so its images
    # differ only by what step k drew, and D3PO trains that step (null: every step differs)
    branch_step: int | None = Field(None, ge=0)
    batch_size: int = Field(32, ge=1)
    splits: list[Literal["train", "eval"]] = Field(["train", "eval"], min_length=1)
    # prompt ranges made in parallel by the `generate` flow (one task each); the output does not depend on it
    shards: int = Field(1, ge=1)
    # images per prompt an annotation round adds when every image of production is labelled
    # (raising images_per_prompt: new seeds, the labelled images keep theirs)
    grow_by: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _groups(self) -> GenerateParams:
        for name in ("images_per_prompt", "grow_by"):
            if getattr(self, name) % self.shared_noise_group:
                raise ValueError(f"{name} must be a multiple of shared_noise_group")
        return self


class ValidateParams(_Strict):
    sample_fraction: float = Field(0.1, gt=0, le=1)  # generations whose objects are fetched and decoded
    full_check: bool = False  # every generation (the CLI's --full does the same once)
    categories: list[str] | None = None  # allowed prompt categories; None = any non-empty
    min_annotators: int = Field(1, ge=1)  # per task
    min_agreement: float = Field(0.4, ge=-1, le=1)  # Krippendorff's alpha over all votes
    min_good_share: float = Field(0.02, ge=0, le=1)  # class balance of binary majorities
    max_good_share: float = Field(0.98, ge=0, le=1)
    min_labels: int = Field(100, ge=0)  # votes in the snapshot before training

    @model_validator(mode="after")
    def _bounds(self) -> ValidateParams:
        if self.min_good_share > self.max_good_share:
            raise ValueError(f"min_good_share {self.min_good_share} is above max_good_share {self.max_good_share}")
        return self


class RewardParams(_Strict):
    # lee: binary good/bad labels, MSE + λ·prompt classification over perturbed prompts
    # (Lee et al. 2023); bradley_terry: preference pairs
    kind: Literal["lee", "bradley_terry"] = "lee"
    ensemble: int = Field(3, ge=1, le=16)  # K heads; their disagreement drives active selection
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0, le=1)
    prompt_classification_weight: float = Field(0.5, ge=0)  # λ
    temperature: float = Field(0.1, gt=0)  # T: the reward in [0, 1] as a logit over candidates
    perturbed_prompts: int = Field(4, ge=1)  # N − 1
    validation_fraction: float = Field(0.2, gt=0, lt=1)  # labelled prompts held out for metrics
    threads: int = Field(2, ge=1)


class LoraParams(_Strict):
    rank: int = Field(8, ge=0)  # 0 = full fine-tune of the UNet
    alpha: float = Field(8.0, gt=0)
    target_modules: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1)


class D3poParams(_Strict):
    beta: float = Field(0.1, gt=0)
    clip: float = Field(0.1, gt=0, lt=1)  # ratio clamp ε (reference code)
    lr: float = Field(1e-4, gt=0, le=1)
    epochs: int = Field(4, ge=1)  # passes over the labelled pairs
    pairs_per_batch: int = Field(8, ge=1)  # whole x_T groups are packed until a batch holds this many
    timestep_fraction: float = Field(0.25, gt=0, le=1)  # denoising steps trained per pair


class PrdpParams(_Strict):
    beta: float = Field(0.05, gt=0)  # tied to the reward's scale ([0, 1] here)
    clip: float = Field(1e-3, gt=0)  # ε around θ_old, per step
    lr: float = Field(3e-5, gt=0, le=1)
    epochs: int = Field(12, ge=1)
    prompts_per_epoch: int = Field(16, ge=2)
    images_per_prompt: int = Field(8, ge=2)
    updates_per_epoch: int = Field(4, ge=1)
    timestep_fraction: float = Field(0.5, gt=0, le=1)


class RewardWeightedParams(_Strict):
    lr: float = Field(1e-3, gt=0, le=1)
    # passes over the good images: the memorisation risk grows with passes, not steps
    epochs: int = Field(90, ge=1)
    batch_size: int = Field(32, ge=1)
    pretrain_weight: float = Field(0.0, ge=0)  # β of the pre-training term
    # unlabelled generations count as good when the reward model says so (semi-supervised)
    reward_threshold: float = Field(0.5, ge=0, le=1)


class DiffusionDpoParams(_Strict):
    # −log σ(β·[(mse_ref^w − mse_ref^l) − (mse_θ^w − mse_θ^l)]): β = 2500 here is β = 5000
    # in the paper's 0.5·β form
    beta: float = Field(2500.0, gt=0)
    lr: float = Field(1e-5, gt=0, le=1)
    steps: int = Field(300, ge=1)
    pairs_per_batch: int = Field(16, ge=1)


class FinetuneParams(_Strict):
    method: Literal["d3po", "prdp", "reward_weighted", "diffusion_dpo"] = "reward_weighted"
    init: str = "production"  # the model fine-tuned (and the frozen reference): production | base | PATH
    lora: LoraParams = LoraParams()
    # Lightning's own names, so a typo fails here rather than an hour into a run
    precision: Literal["32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true"] = "32-true"
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"] = "auto"
    devices: int | Literal["auto"] = Field(1, ge=1)
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp", "deepspeed",
                      "single_device"] = "auto"  # ddp / fsdp on multi-GPU machines
    num_nodes: int = Field(1, ge=1)
    gradient_checkpointing: bool = False  # recompute UNet activations: less memory, ≈30% slower
    accumulate_grad_batches: int = Field(1, ge=1)
    gradient_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(10, ge=1)
    sample_grid_every: int | None = Field(400, ge=1)  # steps between the policy's sample grids (DVCLive); None: never
    threads: int = Field(2, ge=1)
    d3po: D3poParams = D3poParams()
    prdp: PrdpParams = PrdpParams()
    reward_weighted: RewardWeightedParams = RewardWeightedParams()
    diffusion_dpo: DiffusionDpoParams = DiffusionDpoParams()


class EvaluateParams(_Strict):
    images_per_prompt: int = Field(4, ge=2)  # ≥ 2: diversity compares a prompt's images
    max_prompts: int | None = Field(None, ge=1)  # None: every eval-split prompt
    near_copy_distance: float = Field(0.02, ge=0, le=1)  # RMS pixel distance that counts as a copy
    grid_prompts: int = Field(8, ge=1)  # rows of the report's image grid


class GateParams(_Strict):
    min_win_rate: float = Field(0.5, ge=0, le=1)  # candidate over production, learned reward
    min_reward_gain: float = 0.0
    max_diversity_drop: float = Field(0.25, ge=0, le=1)  # relative
    max_memorization_rate: float = Field(0.05, ge=0, le=1)
    min_judge_gain: float = 0.0  # world profile: aligned rate, candidate − production


class RetrainParams(_Strict):
    min_new_labels: int = Field(200, ge=0)  # annotations since the last finished retrain before a retrain runs
    promote: bool = True  # promote automatically when the gate passes


class ScheduleParams(_Strict):
    """Cron schedules of the deployments (`aligndiff deploy`); null = no schedule (run on demand)."""
    work_pool: str = "aligndiff"
    gpu_slots: int = Field(1, ge=1)  # GPU stages running at once on one machine (one per GPU)
    sync_annotations: str | None = "*/10 * * * *"
    annotation_round: str | None = "0 6 * * 1"
    retrain: str | None = "0 2 * * *"

    @model_validator(mode="after")
    def _crons(self) -> ScheduleParams:
        for name in ("sync_annotations", "annotation_round", "retrain"):
            _cron(getattr(self, name), name)
        return self


GPU_PROFILES = ("sd15", "sdxl")


class Params(_Strict):
    profile: Literal["world", "sd15", "sdxl"] = "world"
    # Overrides applied on top of the other sections when `profile` names them; the
    # values above are the world profile's.
    profiles: dict[Literal["sd15", "sdxl"], dict[str, Any]] = {}
    seed: int = Field(0, ge=0)
    services: Services = Services()
    models: Models = Models()
    world: WorldParams = WorldParams()
    curate: CurateParams = CurateParams()
    pretrain_vae: PretrainVaeParams = PretrainVaeParams()
    pretrain_clip: PretrainClipParams = PretrainClipParams()
    pretrain: PretrainParams = PretrainParams()
    sample: SampleParams = SampleParams()
    evaluate_base: EvaluateBaseParams = EvaluateBaseParams()
    generate: GenerateParams = GenerateParams()
    # "validate" would shadow pydantic's BaseModel.validate: the section is read under that alias
    validation: ValidateParams = Field(ValidateParams(), alias="validate")
    reward: RewardParams = RewardParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluation: EvaluateParams = Field(EvaluateParams(), alias="evaluate")
    gate: GateParams = GateParams()
    retrain: RetrainParams = RetrainParams()
    schedules: ScheduleParams = ScheduleParams()

    @model_validator(mode="after")
    def _profile_has_weights(self) -> Params:
        if self.profile != "world":
            for name, what in ((self.profile, "diffusers directory"), ("clip", "CLIP directory, for the reward")):
                if not getattr(self.models, name).resolvable():
                    raise ValueError(f"profile {self.profile} needs models.{name}.path (a local {what}) "
                                     f"or models.{name}.repo_id with a pinned 40-hex revision")
        return self


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown key"
    if kind == "value_error":
        msg = str(err["ctx"]["error"]) if "ctx" in err else err["msg"]
        return f"{loc}: {msg}" if err["loc"] else msg
    msg = err["msg"]
    for prefix, replacement in (("Input should be", "expected"), ("String should match", "expected a string matching"),
                                ("String should have", "expected a string with")):
        if msg.startswith(prefix):
            msg = replacement + msg[len(prefix):]
    return f"{loc}: {msg}, got {err.get('input')!r}"


def _lines(source: str, exc: ValidationError, prefix: str = "") -> str:
    """One line per wrong value: the branches of a union (``int | 'auto'``) come as
    consecutive errors on one input, tagged with the branch; they make one line."""
    lines, errors = [], exc.errors()
    i = 0
    while i < len(errors):
        group = [errors[i]]
        while (i + len(group) < len(errors) and len(errors[i]["loc"]) > 1
               and errors[i + len(group)]["loc"][:-1] == errors[i]["loc"][:-1]
               and repr(errors[i + len(group)].get("input")) == repr(errors[i].get("input"))):
            group.append(errors[i + len(group)])
        if len(group) == 1:
            lines.append(f"{source}: {prefix}{_describe(group[0])}")
        else:
            loc = ".".join(str(p) for p in group[0]["loc"][:-1])
            wanted = " or ".join(e["msg"].removeprefix("Input should be ") for e in group)
            lines.append(f"{source}: {prefix}{loc}: expected {wanted}, got {group[0].get('input')!r}")
        i += len(group)
    return "\n".join(lines)


def parse_params(data: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping; raise ParamsError with one line per problem."""
    if data is None:
        raise ParamsError(f"{source}: empty; expected the sections of params.yaml (profile, services, …)")
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    overlays = data.get("profiles") or {}
    if not isinstance(overlays, dict) or not all(isinstance(v, dict) for v in overlays.values()):
        raise ParamsError(f"{source}: profiles: expected a mapping of profile name → overrides")
    unknown = [name for name in overlays if name not in GPU_PROFILES]
    if unknown:
        raise ParamsError(f"{source}: profiles.{unknown[0]}: unknown profile (expected one of {', '.join(GPU_PROFILES)})")
    try:  # the file's own sections first, so their errors carry their own key paths
        Params.model_validate({**data, "profiles": {}})
    except ValidationError as exc:
        raise ParamsError(_lines(source, exc)) from None
    for name, overlay in overlays.items():  # every profile's overrides are checked, not only the active one's
        for key in ("profile", "profiles", "services", "models"):
            if key in overlay:
                raise ParamsError(f"{source}: profiles.{name}.{key}: cannot be overridden by a profile")
        try:
            Params.model_validate({**_merged(data, overlay), "profile": "world", "profiles": {}})
        except ValidationError as exc:
            raise ParamsError(_lines(source, exc, prefix=f"profiles.{name}.")) from None
    active = overlays.get(data.get("profile"))
    try:
        return Params.model_validate(_merged(data, active) if active else data)
    except ValidationError as exc:
        raise ParamsError(_lines(source, exc)) from None


def _merged(base: dict, overlay: dict) -> dict:
    """``base`` with ``overlay``'s values; nested mappings merge key by key."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run aligndiff from the project root)") from None
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsError(f"{path}{where}: invalid YAML: {problem}") from None
    return parse_params(data, source=str(path))


def patched_params_text(path: Path, updates: dict) -> str:
    """params.yaml with ``updates`` (nested sections → values) written in; comments, order
    and quoting kept, so the diff is the change only."""
    import io

    from ruamel.yaml import YAML
    from ruamel.yaml.representer import RoundTripRepresenter

    class NullAsNull(RoundTripRepresenter):
        """Writes None as ``null``, as params.yaml does (ruamel leaves it empty). A subclass:
        add_representer on ruamel's own class would change how DVC, in this process, writes dvc.lock."""

    NullAsNull.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    round_trip = YAML()
    round_trip.Representer = NullAsNull
    round_trip.preserve_quotes = True
    data = round_trip.load(path.read_text(encoding="utf-8"))

    def merge(node, changes: dict) -> None:
        for key, value in changes.items():
            if isinstance(value, dict):  # a minimal params.yaml may leave a section out
                merge(node.setdefault(key, {}), value)
            else:
                node[key] = value

    merge(data, updates)
    out = io.StringIO()
    round_trip.dump(data, out)
    return out.getvalue()


def update_params(path: str | Path, updates: dict) -> Params:
    """Write ``updates`` into params.yaml, as `dvc exp run -S` does; the edited file is
    validated before it replaces the old one, so a bad value changes nothing."""
    import os

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(patched_params_text(path, updates), encoding="utf-8")
    try:
        params = load_params(tmp)
    except Exception:
        tmp.unlink()
        raise
    os.replace(tmp, path)
    return params
