"""`aligndiff sample`: images from a model for a prompts file, for people and for checks.

Writes ``OUT/NNNN_K.png`` (prompt NNNN, image K) and ``OUT/manifest.csv`` (prompt,
seed, path relative to OUT). Same arguments ⇒ same images. The output folder is
built beside OUT and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
from pathlib import Path

from components import models
from components.errors import UserError
from components.project import Project
from components.sampling import SamplerConfig, derive_seed, sample


def read_prompts(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: prompts file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder; --prompts takes a text file, one prompt per line") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text") from None
    prompts = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{path}: no prompts (expected one prompt per line)")
    return prompts


def run(project: Project, model: str, prompts_file: Path, n: int, seed: int, out: Path,
        batch_size: int = 32) -> list[dict]:
    import torch

    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    prompts = read_prompts(prompts_file)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; --out takes a folder (new or empty)")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; choose another --out")
    torch.set_num_threads(project.params.pretrain.threads)
    pipe = models.on_accelerator(models.load_pipeline(models.resolve(project, model)), project.params.sample.dtype)
    config = SamplerConfig.from_params(project.params.sample)
    jobs = [(i, k, p, derive_seed(seed, f"{i}:{k}")) for i, p in enumerate(prompts) for k in range(n)]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    rows = []
    try:
        from PIL import Image

        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            images = sample(pipe, [p for _, _, p, _ in chunk], [s for *_, s in chunk], config, record=False).images
            for (i, k, prompt, s), image in zip(chunk, images):
                name = f"{i:04d}_{k}.png"
                Image.fromarray(image).save(staging / name)
                rows.append({"prompt": prompt, "seed": s, "path": name})
        with open(staging / "manifest.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["prompt", "seed", "path"])
            writer.writeheader()
            writer.writerows(rows)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return rows
