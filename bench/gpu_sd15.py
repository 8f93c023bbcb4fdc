"""GPU proof of the sd15 (and, through bench/gpu_sdxl.py, sdxl) code path at the profile's
resolution (SD1.5: 512×512 images, 4×64×64 latents).

    .venv/bin/python bench/gpu_sd15.py                                  # on a GPU machine
    .venv/bin/python bench/gpu_sd15.py --size 64 --steps 4 --model tiny # CPU smoke test of the same path
    .venv/bin/python bench/gpu_sdxl.py --size 64 --steps 4 --model tiny # the same for SDXL

The profile's real architecture with random weights (bench/sd_sized.py: SD1.5's 860M or
SDXL's 2.6B-parameter UNet and their text towers; no download, no services), driven by the
project's own code with the profile's params: generation with recorded trajectories
(sampling.sample, weights in sample.dtype), then one D3PO and one PRDP optimiser step
through Lightning (finetune.precision, LoRA, gradient checkpointing). Records seconds,
images/s, peak GPU memory per phase and FLOPs utilisation against the card's bf16 peak
(bench/results/gpu_<profile>.jsonl). ``--model tiny`` swaps in the tests' tiny model.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components import models  # noqa: E402
from components.config import parse_params  # noqa: E402
from components.finetune import methods  # noqa: E402
from components.finetune.stage import trainer_for  # noqa: E402
from components.sampling import SamplerConfig, sample  # noqa: E402
from tests.models import save_tiny_clip, save_tiny_sdxl, save_tiny_stable_diffusion  # noqa: E402

BUILDERS = {"sd15": save_tiny_stable_diffusion, "sdxl": save_tiny_sdxl}
PROMPTS = ["two red circles on a white background", "one blue square on a black background"]


def profile_params(profile: str, model_dir: Path, steps: int, on_gpu: bool):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["profile"] = profile
    data["models"][profile] = {"path": str(model_dir), "repo_id": None, "revision": None}
    data["models"]["clip"] = {"path": str(model_dir.parent / "tiny-clip"), "repo_id": None, "revision": None}
    data["profiles"][profile]["sample"]["steps"] = steps
    finetune = data["profiles"][profile]["finetune"]
    finetune["prdp"].update(prompts_per_epoch=2, images_per_prompt=2, updates_per_epoch=1)
    if not on_gpu:  # the smoke test: same code, CPU engineering
        finetune.update(accelerator="cpu", precision="32-true")
    return parse_params(data)


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, round(time.perf_counter() - t0, 3)


def generate(pipe, sampler: SamplerConfig, n: int):
    """n images in pairs that share x_T, with trajectories, as the generate stage samples them."""
    prompts = [PROMPTS[i // 2 % len(PROMPTS)] for i in range(n)]
    return sample(pipe, prompts, list(range(n)), sampler, init_seeds=[i // 2 for i in range(n)])


def one_step(module) -> float:
    trainer, loader = trainer_for(module.cfg, 1, [])
    trainer.fit(module, loader)
    return float(trainer.callback_metrics["loss"])


# Dense bf16 tensor-core peaks (FLOP/s) of the cards we expect; others report no utilisation.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12}


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for card, peak in PEAK_BF16.items() if card in name), None)


def measure(name: str, fn, result: dict, count_flops: bool):
    """Time ``fn`` and record its seconds, peak GPU memory and (from a second, counted run)
    FLOPs utilisation against the card's peak. Counted FLOPs include what gradient
    checkpointing recomputes (hardware FLOPs), so training utilisations are upper bounds of MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    out, seconds = timed(fn)
    result[f"{name}_s"] = seconds
    if torch.cuda.is_available():
        result[f"{name}_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if count_flops:
        with FlopCounterMode(display=False) as counter:
            fn()
        flops = counter.get_total_flops()
        result[f"{name}_gflop"] = round(flops / 1e9, 1)
        if peak_flops():
            result[f"{name}_flops_utilisation"] = round(flops / seconds / peak_flops(), 3)
    return out


def main(profile: str = "sd15") -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512 if profile == "sd15" else 1024,
                    help="image side (512: 64×64 latents, as SD1.5; 1024: 128×128, as SDXL)")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps")
    ap.add_argument("--pairs", type=int, default=4, help="D3PO pairs (images share x_T in twos)")
    ap.add_argument("--model", choices=["full", "tiny"], default="full",
                    help="full: the profile's real architecture, random weights; tiny: the tests' model")
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / f"{args.model}-{profile}"
        if args.model == "full":
            from sd_sized import save_sd_sized

            save_sd_sized(profile, model_dir, args.size)
        else:
            BUILDERS[profile](model_dir, image_size=args.size)
        save_tiny_clip(Path(tmp) / "tiny-clip")
        params = profile_params(profile, model_dir, args.steps, on_gpu)
        sampler = SamplerConfig.from_params(params.sample)
        pipe = models.on_accelerator(models.load_pipeline(model_dir), params.sample.dtype)
        result = {"profile": profile, "model": args.model,
                  "unet_params_M": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1),
                  "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
                  "torch": torch.__version__, "size": args.size, "steps": args.steps,
                  "sample_dtype": params.sample.dtype if on_gpu else "float32",
                  "precision": params.finetune.precision, "lora_rank": params.finetune.lora.rank,
                  "gradient_checkpointing": params.finetune.gradient_checkpointing}

        n = 2 * args.pairs
        generate(pipe, SamplerConfig(steps=2), 2)  # warm-up: kernels chosen, memory pools grown
        traj = measure("generate", partial(generate, pipe, sampler, n), result, count_flops=True)
        assert traj.images.shape == (n, args.size, args.size, 3), traj.images.shape
        assert traj.latents.shape[1:] == (args.steps + 1, 4, args.size // 8, args.size // 8), traj.latents.shape
        result["images_per_s"] = round(n / result["generate_s"], 2)
        result["trajectory_mb"] = round(traj.latents[0].numel() * 4 / 2**20, 2)
        del pipe

        pairs = methods.TrajectoryPairs.of(traj, winner=range(0, n, 2), loser=range(1, n, 2))
        d3po = methods.D3PO(models.on_accelerator(models.load_pipeline(model_dir)), params.finetune, params.seed,
                            pairs, sampler)
        d3po.schedule = [np.arange(args.pairs)]
        result["d3po_loss"] = measure("d3po_step", partial(one_step, d3po), result, count_flops=False)
        del d3po

        def brightness(images: np.ndarray, _prompts: list[str]) -> np.ndarray:  # any callable reward
            return images.reshape(len(images), -1).mean(axis=1) / 255.0

        prdp = methods.PRDP(models.on_accelerator(models.load_pipeline(model_dir)), params.finetune, params.seed,
                            PROMPTS, brightness, sampler)
        prdp.schedule = [np.zeros(0, int)]
        result["prdp_loss"] = measure("prdp_step", partial(one_step, prdp), result, count_flops=False)
    assert np.isfinite([result["d3po_loss"], result["prdp_loss"]]).all(), result
    results = REPO / "bench" / "results" / f"gpu_{profile}.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as fh:
        fh.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
