"""Benchmark: world-model sampling speed on this CPU and the size of a stored trajectory.

    .venv/bin/python bench/generate_speed.py [--batch 32] [--steps 20] [--repeats 2]

Uses models/base when it exists (else the configured architecture, untrained: the
speed is the same). Prints JSON: images/s, seconds per denoising step (whole batch
and per image), bytes per trajectory (safetensors, as the generate stage stores it).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from components import generate
from components.config import load_params
from components.sampling import SamplerConfig, sample
from components.world.grammar import all_compositions
from components.models import load_pipeline
from components.world.model import untrained


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    params = load_params("params.yaml")
    torch.set_num_threads(params.pretrain.threads)
    base = Path("models/base")
    pipe = load_pipeline(base) if (base / "model_index.json").exists() else untrained(params.world)[0]
    prompts = [c.prompt for c in all_compositions()][: args.batch]
    config = SamplerConfig(steps=args.steps, guidance_scale=params.sample.guidance_scale, eta=1.0)
    sample(pipe, prompts[:2], [0, 1], SamplerConfig(steps=2))  # warm-up
    times = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        traj = sample(pipe, prompts, list(range(r * 1000, r * 1000 + len(prompts))), config)
        times.append(time.perf_counter() - t0)
    best = min(times)
    size = len(generate.trajectory_bytes(traj, 0, {"generation_id": "x" * 16, "prompt": prompts[0]}))
    print(json.dumps({
        "model": str(base) if base.exists() else "untrained (configured architecture)",
        "unet_params_M": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 3),
        "batch": len(prompts), "steps": args.steps, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "seconds_per_batch": round(best, 2),
        "images_per_second": round(len(prompts) / best, 2),
        "seconds_per_step_batch": round(best / args.steps, 3),
        "seconds_per_step_per_image": round(best / args.steps / len(prompts), 4),
        "bytes_per_trajectory": size,
    }, indent=2))


if __name__ == "__main__":
    main()
