"""Benchmark: peak memory and time of one PRDP epoch at the configured defaults (world, CPU).

    .venv/bin/python bench/prdp_memory.py

One epoch's sampling (finetune.prdp.prompts_per_epoch × images_per_prompt, recorded
trajectories and reference log-probs) and one update over timestep_fraction of the
steps. Uses models/base when it exists (else the configured architecture, untrained:
memory and time are the same). Rewards are random: only the cost is measured.
Prints JSON: peak resident MiB after sampling and after the update, seconds of each.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from components.config import load_params
from components.finetune import methods
from components.sampling import SamplerConfig
from components.world.grammar import all_compositions
from components.models import load_pipeline
from components.world.model import untrained


def peak_mib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def main() -> None:
    params = load_params("params.yaml")
    cfg = params.finetune
    torch.set_num_threads(cfg.threads)
    base = Path("models/base")
    pipe = load_pipeline(base) if (base / "model_index.json").exists() else untrained(params.world)[0]
    prompts = [c.prompt for c in all_compositions()]
    rng = np.random.default_rng(0)
    module = methods.PRDP(pipe, cfg, params.seed, prompts, lambda images, _: rng.random(len(images)),
                          SamplerConfig.from_params(params.sample))
    start = time.monotonic()
    module.resample(0)
    sampled = {"sample_s": round(time.monotonic() - start, 1), "peak_mib_after_sampling": peak_mib()}
    start = time.monotonic()
    steps = methods.step_subset(params.sample.steps, cfg.prdp.timestep_fraction, torch.Generator().manual_seed(0))
    loss, _ = module.prdp_loss(module.epoch_samples, steps)
    loss.backward()
    print(json.dumps({"images": cfg.prdp.prompts_per_epoch * cfg.prdp.images_per_prompt, "steps_per_update": len(steps),
                      **sampled, "update_s": round(time.monotonic() - start, 1), "peak_mib_after_update": peak_mib()}))


if __name__ == "__main__":
    main()
