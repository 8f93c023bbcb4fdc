"""Side by side, in one run on one machine: our sampler against stock diffusers, and our
D3PO / PRDP training step against a reference-style loop.

    .venv/bin/python bench/side_by_side.py                     # CPU: SD-shaped tiny model, 64 px
    .venv/bin/python bench/side_by_side.py --size 512 --batch 8   # GPU: SD1.5's latent size

- generation: ``sampling.sample`` (recording trajectories, and not) against
  ``StableDiffusionPipeline.__call__`` with the same model, steps, guidance, batch and
  DDIM eta = 1. Ratio = stock seconds / ours.
- training: one optimiser step over the same pairs (groups of images sharing x_T) and
  denoising steps. Ours: the ``D3PO`` / ``PRDP`` modules (each trajectory scored once per
  step, guidance batched with the prompt). Reference-style, as the public D3PO code: one
  UNet call per trajectory and step, guidance as two calls. Each variant runs in its own
  process, so that its peak memory is its own (peak RSS during the steps on CPU, max allocated
  on a GPU).
  Ratios: throughput ours / reference, memory ours / reference.

The model is SD1.5-shaped with random weights (tests/models.py): the ratios measure the
code, not the weights. Appends the run to bench/results/side_by_side.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components import models  # noqa: E402
from components.config import FinetuneParams  # noqa: E402
from components.finetune import methods  # noqa: E402
from components.sampling import SamplerConfig, ddim_step, derive_seed, sample, timestep_pairs  # noqa: E402
from tests.models import save_tiny_stable_diffusion  # noqa: E402

RESULTS = REPO / "bench" / "results" / "side_by_side.jsonl"
PROMPTS = ["two red circles on a white background", "one blue square on a black background",
           "three green triangles on a gray background", "four yellow circles on a white background"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    """Best of ``repeats`` (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def load(model_dir: Path):
    pipe = models.on_accelerator(models.load_pipeline(model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generation(model_dir: Path, batch: int, steps: int, repeats: int) -> dict:
    pipe = load(model_dir)
    config = SamplerConfig(steps=steps, guidance_scale=5.0, eta=1.0)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    seeds = list(range(batch))
    stock = timed(lambda: pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, eta=1.0,
                               generator=torch.Generator(pipe.device).manual_seed(0), output_type="np"), repeats)
    recording = timed(lambda: sample(pipe, prompts, seeds, config), repeats)
    plain = timed(lambda: sample(pipe, prompts, seeds, config, record=False), repeats)
    return {"stock_s": round(stock, 3), "ours_recording_s": round(recording, 3), "ours_s": round(plain, 3),
            "ratio_recording": round(stock / recording, 2), "ratio": round(stock / plain, 2)}


# ---- the reference-style loop: one trajectory at a time, guidance as two UNet calls -----

def reference_log_prob(unet, scheduler, traj, i: int, step: int, prev_t: int, config: SamplerConfig):
    x_t = traj.latents[i:i + 1, step].to(unet.device)
    t = int(traj.timesteps[step])
    cond = traj.cond[i:i + 1].to(unet.device)
    uncond = traj.uncond[i:i + 1].to(unet.device)
    out_uncond = unet(x_t, t, **uncond.unet_kwargs()).sample
    out_cond = unet(x_t, t, **cond.unet_kwargs()).sample
    guided = out_uncond + config.guidance_scale * (out_cond - out_uncond)
    return ddim_step(scheduler, guided, t, prev_t, x_t, config.eta,
                     prev_sample=traj.latents[i:i + 1, step + 1].to(unet.device))[1]


def reference_d3po_loss(module, traj, winner, loser, steps: list[int], config: SamplerConfig):
    _, prevs = timestep_pairs(module.pipe.scheduler, len(traj.timesteps))
    losses = []
    for step in steps:
        for w, l in zip(winner, loser):  # every pair on its own, as the public D3PO code iterates
            ratios = []
            for i in (w, l):
                policy = reference_log_prob(module.unet, module.pipe.scheduler, traj, i, step, int(prevs[step]), config)
                with module.reference_unet() as ref:
                    reference = reference_log_prob(ref, module.pipe.scheduler, traj, i, step, int(prevs[step]), config)
                eps = module.cfg.d3po.clip
                ratios.append(torch.log(torch.exp(policy - reference).clamp(1 - eps, 1 + eps)))
            losses.append(-torch.nn.functional.logsigmoid(module.cfg.d3po.beta * (ratios[0] - ratios[1])))
    return torch.cat(losses).mean()


def reference_prdp_loss(module, samples: dict, steps: list[int], config: SamplerConfig):
    traj, c = samples["traj"], module.cfg.prdp
    _, prevs = timestep_pairs(module.pipe.scheduler, len(traj.timesteps))
    policy = torch.stack([torch.cat([reference_log_prob(module.unet, module.pipe.scheduler, traj, i, s,
                                                        int(prevs[s]), config) for s in steps])
                          for i in range(len(traj.latents))])
    ratio = policy - samples["ref"][:, steps].to(policy.device)
    old_ratio = traj.log_probs[:, steps].to(policy.device) - samples["ref"][:, steps].to(policy.device)
    clipped = torch.maximum(torch.minimum(ratio, old_ratio + c.clip), old_ratio - c.clip)
    target = ((samples["rewards"][samples["a"]] - samples["rewards"][samples["b"]]) / c.beta).to(policy.device)

    def pair_loss(r):
        r_hat = r.mean(dim=1)
        return (r_hat[samples["a"]] - r_hat[samples["b"]] - target) ** 2

    return torch.maximum(pair_loss(ratio), pair_loss(clipped)).mean()


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def brightness(images: np.ndarray, _prompts) -> np.ndarray:
    return images.reshape(len(images), -1).mean(axis=1) / 255.0


def training(model_dir: Path, method: str, variant: str, groups: int, group_size: int, steps: int,
             repeats: int) -> dict:
    """One variant in this process: seconds per optimiser step and peak memory."""
    config = SamplerConfig(steps=steps, guidance_scale=5.0, eta=1.0)
    # every denoising step trained, in both variants (d3po's default trains a random quarter)
    cfg = FinetuneParams(method=method, d3po={"timestep_fraction": 1.0})
    pipe = load(model_dir)
    n = groups * group_size
    prompts = [PROMPTS[g % len(PROMPTS)] for g in range(groups) for _ in range(group_size)]
    seeds = [derive_seed(1, str(i)) for i in range(n)]
    traj = sample(pipe, prompts, seeds, config, init_seeds=[s // group_size for s in range(n)])
    # every pair of a group (K − 1 per image, as D3PO trains them)
    winner = [g * group_size + a for g in range(groups) for a in range(group_size) for b in range(a + 1, group_size)]
    loser = [g * group_size + b for g in range(groups) for a in range(group_size) for b in range(a + 1, group_size)]
    trained_steps = list(range(steps))
    if method == "d3po":
        module = methods.D3PO(pipe, cfg, 0, methods.TrajectoryPairs.of(traj, winner, loser), config)
        module.schedule = [np.arange(len(winner))]
        if variant == "ours":
            def loss():
                return module.training_step(None, 0)
        else:
            def loss():
                return reference_d3po_loss(module, traj, winner, loser, trained_steps, config)
    else:
        cfg = FinetuneParams(method=method, prdp={"prompts_per_epoch": groups, "images_per_prompt": group_size})
        module = methods.PRDP(pipe, cfg, 0, PROMPTS[:groups], brightness, config)
        module.resample(0)
        if variant == "ours":
            def loss():
                return module.prdp_loss(module.epoch_samples, trained_steps)[0]
        else:
            def loss():
                return reference_prdp_loss(module, module.epoch_samples, trained_steps, config)
    optimiser = module.configure_optimizers()
    module.log = lambda *args, **kwargs: None  # no Trainer here: the step alone is measured

    def step():
        optimiser.zero_grad()
        loss().backward()
        optimiser.step()

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: reset the peak RSS, so that it is the training steps' (model and data included)
        Path("/proc/self/clear_refs").write_text("5")
    seconds = timed(step, repeats)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else peak_rss()
    return {"seconds": seconds, "pairs": len(winner), "images": n, "peak_mb": round(peak / 2**20, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64, help="image side (512: SD1.5's 64×64 latents)")
    ap.add_argument("--batch", type=int, default=16, help="generation batch")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps")
    ap.add_argument("--groups", type=int, default=4, help="training: x_T groups (prompts)")
    ap.add_argument("--group-size", type=int, default=4, help="training: images per group")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: METHOD:VARIANT:MODEL_DIR, one process each
    args = ap.parse_args()
    if args.variant:
        method, variant, model_dir = args.variant.split(":", 2)
        print(json.dumps(training(Path(model_dir), method, variant, args.groups, args.group_size, args.steps,
                                  args.repeats)))
        return 0

    on_gpu = torch.cuda.is_available()
    result = {"device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "size": args.size,
              "batch": args.batch, "steps": args.steps, "groups": args.groups, "group_size": args.group_size}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_stable_diffusion(Path(tmp) / "sd", image_size=args.size)
        result["generation"] = generation(model_dir, args.batch, args.steps, args.repeats)
        for method in ("d3po", "prdp"):
            runs = {}
            for variant in ("ours", "reference"):
                out = subprocess.run([sys.executable, __file__, "--variant", f"{method}:{variant}:{model_dir}",
                                      *(f"--{k}={v}" for k, v in (("steps", args.steps), ("groups", args.groups),
                                                                  ("group-size", args.group_size),
                                                                  ("repeats", args.repeats)))],
                                     capture_output=True, text=True, check=True)
                runs[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            ours, ref = runs["ours"], runs["reference"]
            result[method] = {"ours_s": round(ours["seconds"], 3), "reference_s": round(ref["seconds"], 3),
                              "pairs": ours["pairs"], "ours_peak_mb": ours["peak_mb"],
                              "reference_peak_mb": ref["peak_mb"],
                              "throughput_ratio": round(ref["seconds"] / ours["seconds"], 2),
                              "memory_ratio": round(ours["peak_mb"] / ref["peak_mb"], 2)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as fh:
        fh.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
