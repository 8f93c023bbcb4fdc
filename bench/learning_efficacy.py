"""Benchmark: does feedback fine-tuning raise judge alignment, and does it beat more pre-training?

    .venv/bin/python bench/learning_efficacy.py --method d3po [--images-per-prompt 8]
        [--set finetune.d3po.lr=1e-4 ...] [--control MINUTES] [--rounds N]
        [--label-fraction 0.5 --select disagreement|random] [--note TEXT]

Needs the embedded services (`aligndiff up`) and the pre-trained base, VAE and CLIP (`dvc repro pretrain`).
One feedback round in a scratch project next to the repo (the repo's data is untouched):
generate K images per train prompt (pairs sharing x_T) with the base model → label them
with the simulated annotators' policy (3 votes, 10% flips; the Label Studio round trip is
tested elsewhere) → train the reward model (PRDP, reward-weighted) → fine-tune → judge
alignment of base and candidate on seen compositions (4 images each, 288) and on the
compositions held out of pre-training (8 each, 192), same seeds for both models.
``--rounds N`` makes that N online rounds, each on the previous round's model, and
charts judge alignment against the votes used (bench/results/rounds-*.png and .csv).
``--label-fraction F --select disagreement`` labels only a share F of the round's tasks,
the second half of them picked by active selection (``random``: its control).
``--control MINUTES`` continues pre-training the base for that wall time instead;
``--method reward_weighted --pretraining-term-only STEPS`` runs that method's pre-training
term alone (the same LoRA and learning rate, for the steps a feedback run reported; no feedback).
Results are appended to bench/results/efficacy.jsonl (wall minutes on this machine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components import curate, feedback, generate, models  # noqa: E402
from components.annotation import oracle, rounds, studio  # noqa: E402
from components.annotation.simulate import AnnotatorConfig  # noqa: E402
from components.project import Project  # noqa: E402
from components.sampling import SamplerConfig  # noqa: E402
from components.world.alignment import evaluate, split_compositions  # noqa: E402

RESULTS = REPO / "bench" / "results" / "efficacy.jsonl"


def _scalar(text: str):
    """A YAML value, with 1e-4 read as a number (YAML 1.1 wants 1.0e-4 and reads it as a string)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def params_with(overrides: list[str], **sections) -> dict:
    """The repo's params.yaml, ``sections`` merged in, then ``KEY.PATH=VALUE`` overrides (VALUE read as YAML)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    for item in overrides:
        dotted, value = item.split("=", 1)
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = _scalar(value)
    return params


def scratch_project(root: Path, overrides: list[str]) -> Project:
    shutil.rmtree(root, ignore_errors=True)
    (root / "models").mkdir(parents=True)
    params = params_with(overrides, generate={"splits": ["train"]}, finetune={"init": "base"})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / ".env", root / ".env")
    (root / ".aligndiff").symlink_to(REPO / ".aligndiff")  # the running services' credentials and ports
    for part in ("vae", "clip", "base"):  # the base and the parts it was pre-trained on (the reward's CLIP)
        (root / "models" / part).symlink_to(REPO / "models" / part)
    return Project.load(root)


def alignment(pipe, params, seed: int) -> dict:
    splits = split_compositions(params.world.holdout)
    config = SamplerConfig.from_params(params.sample)
    return {"seen": evaluate(pipe, splits["seen"], 4, seed, config),
            "unseen": evaluate(pipe, splits["unseen"], 8, seed, config)}


def feedback_round(project: Project, method: str, fraction: float = 1.0, select: str = "random") -> dict:
    from components.finetune import stage as finetune_stage
    from components.reward import train as reward_train

    timings = {}
    start = time.monotonic()
    curate.run(project.root)
    generate.run(project)
    timings["generate_s"] = time.monotonic() - start
    labels = label_round(project, binary=True, fraction=fraction, select=select, seed=project.params.seed)
    if method in ("prdp", "reward_weighted"):
        t = time.monotonic()
        reward = reward_train.train_reward(project.params, project.root, project.object_store())
        timings["reward_s"] = time.monotonic() - t
        labels["reward_validation"] = reward["validation"]
        labels["reward_vs_judge"] = reward.get("judge_on_unseen_prompts")
    t = time.monotonic()
    report = finetune_stage.finetune(project)
    timings["finetune_s"] = time.monotonic() - t
    return {"labels": labels, "finetune": report, "timings": timings}


def label_round(project: Project, binary: bool, fraction: float = 1.0, select: str = "random", seed: int = 0
                ) -> dict:
    """The simulated annotators' votes (3 per task, 10% flipped) on the manifest's generations:
    pairwise tasks, and with ``binary`` one binary task per image too.

    ``fraction`` < 1 labels that share of each kind's tasks in two halves, as two rounds
    would: a random half, then the other half chosen by ``select`` among the rest —
    ``random``, or ``disagreement`` (the round's active selection: where the ensemble of
    a reward model trained on the first half disagrees most)."""
    gens = feedback.generations(project.root)
    images = dict(zip(gens.index, feedback.Fetcher(project.object_store()).images(list(gens["image_key"]))))
    config = AnnotatorConfig(coverage=3, flip_rate=0.1)

    def write(only):
        tasks, prefs = oracle.label(gens, images, config, binary=binary, only=only)
        oracle.write(tasks, prefs, project.path("data/labels"))
        return {"tasks": len(tasks), "votes": 3 * len(tasks), "preferences": len(prefs)}

    if fraction >= 1:
        return write(None)
    units = oracle.units(gens, binary=binary)
    specs = [studio.TaskSpec(gens.at[ids[0], "prompt"], tuple(ids), tuple(gens.loc[ids, "image_key"]))
             for _, ids in units]
    index = {spec.generation_ids: i for i, spec in enumerate(specs)}
    by_kind = {kind: [i for i, (k, _) in enumerate(units) if k == kind] for kind in sorted({k for k, _ in units})}
    first = set()
    for ids in by_kind.values():
        first |= {index[s.generation_ids] for s in rounds.select([specs[i] for i in ids],
                                                                 round(fraction * len(ids) / 2), seed)}
    write(first)
    if select == "disagreement":
        from components.reward import train as reward_train

        reward_train.train_reward(project.params, project.root, project.object_store())
    chosen = set(first)
    for ids in by_kind.values():
        rest = [specs[i] for i in ids if i not in first]
        n = round(fraction * len(ids)) - round(fraction * len(ids) / 2)
        if select == "disagreement":
            picked = rounds.select_active(rest, n, rounds.ensemble_disagreement(project, gens, rest), seed)
        else:
            picked = rounds.select(rest, n, seed + 1)
        chosen |= {index[s.generation_ids] for s in picked}
    return {**write(chosen), "fraction": fraction, "select": select}


def online_rounds(project: Project, method: str, rounds: int, seed: int) -> dict:
    """``--rounds N``, as the papers iterate: sample the current model, label its images,
    fine-tune from it (so the reference and θ_old are refreshed), and the candidate is the
    next round's model; no gate between rounds. Each round's judge alignment, against the
    votes used so far, goes into the result, a CSV and a chart."""
    import dataclasses

    from components.finetune import stage as finetune_stage
    from components.reward import train as reward_train

    current, votes, curve, rounds_out = "base", 0, [], []
    start = time.monotonic()
    curate.run(project.root)
    for r in range(1, rounds + 1):
        params = project.params.model_copy(update={"finetune": project.params.finetune.model_copy(
            update={"init": current})})
        this = dataclasses.replace(project, params=params)
        generate.run(this, model=current)
        labels = label_round(this, binary=method in ("prdp", "reward_weighted"))  # a reward model learns from those
        votes += labels["votes"]
        if method in ("prdp", "reward_weighted"):
            labels["reward_vs_judge"] = reward_train.train_reward(params, this.root, this.object_store()).get(
                "judge_on_unseen_prompts")
        report = finetune_stage.finetune(this)
        out = this.path(f"models/round-{r}")  # candidate.json names "../<previous round>": same depth
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(this.path("models/candidate"), out)
        current = f"models/round-{r}"
        scores = alignment(models.load_pipeline(out), params, seed)
        point = {"round": r, "votes": votes, "minutes": round((time.monotonic() - start) / 60, 2),
                 "seen": scores["seen"]["aligned"], "unseen": scores["unseen"]["aligned"]}
        curve.append(point)
        rounds_out.append({**point, "labels": labels, "finetune": {k: report[k] for k in ("steps", "data", "final")},
                           "alignment": scores})
        print(json.dumps(point), flush=True)
    return {"rounds": rounds_out, "curve": curve}


def write_curve(curve: list[dict], base: dict, out: Path, title: str) -> None:
    """The judge-alignment curve against votes used: a CSV and a PNG chart (seen solid,
    held-out dashed)."""
    from PIL import Image, ImageDraw

    points = [{"round": 0, "votes": 0, "seen": base["seen"]["aligned"], "unseen": base["unseen"]["aligned"]}, *curve]
    out.with_suffix(".csv").write_text("round,votes,seen,unseen\n" + "".join(
        f"{p['round']},{p['votes']},{p['seen']},{p['unseen']}\n" for p in points))
    width, height, pad = 640, 400, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    most = max(p["votes"] for p in points) or 1

    def xy(p, key):
        return pad + (width - 2 * pad) * p["votes"] / most, height - pad - (height - 2 * pad) * p[key]

    draw.rectangle([pad, pad, width - pad, height - pad], outline="black")
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        y = height - pad - (height - 2 * pad) * tick
        draw.text((8, y - 6), f"{tick:.0%}", fill="black")
    draw.text((pad, height - pad + 8), "0 votes", fill="black")
    draw.text((width - pad - 60, height - pad + 8), f"{most} votes", fill="black")
    draw.text((pad, 15), f"{title}: judge-aligned, seen (blue) and held-out (red)", fill="black")
    for key, colour in (("seen", "blue"), ("unseen", "red")):
        line = [xy(p, key) for p in points]
        draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    image.save(out.with_suffix(".png"))


def continued_pretraining(project: Project, minutes: float) -> tuple[object, int]:
    """The control: keep pre-training the base on fresh batches (another seed) at a small
    constant learning rate for ``minutes``, on the plain loss of pre-training's last phase;
    the EMA weights are evaluated, as for the base."""
    import lightning as L

    from components.world.pretrain import PretrainModule, load_parts

    params = project.params
    cfg = params.pretrain.model_copy(update={"lr": 1e-4, "warmup_steps": 1, "steps": 10**6,
                                            "shape_weight_steps": 0})
    params = params.model_copy(update={"seed": params.seed + 1, "pretrain": cfg})
    base = models.load_pipeline(models.resolve(project, "base"))
    module = PretrainModule(*load_parts(project.root), params, unet=base.unet)
    trainer = L.Trainer(max_time={"minutes": minutes}, max_steps=-1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(range(10**6), batch_size=1))
    return module.ema_pipeline(), trainer.global_step


def pretraining_term_only(project: Project, steps: int):
    """The control for reward-weighted fine-tuning: its pre-training term alone (every
    feedback weight zero), with the same LoRA and learning rate, for ``steps``."""
    from components.finetune import methods
    from components.finetune.stage import encode_text, prior_batches, trainer_for
    from components.sampling import sample_shape

    params = project.params
    cfg = params.finetune
    pipe = models.load_pipeline(models.resolve(project, "base"))
    module = methods.RewardWeighted(pipe, cfg, params.seed, torch.zeros(1, *sample_shape(pipe)),
                                    encode_text(pipe, ["one red circle on a white background"]), torch.zeros(1),
                                    prior_batches(project, pipe, None, None))
    module.schedule = [np.zeros(1, int)]
    trainer, loader = trainer_for(cfg, steps, [])
    trainer.fit(module, loader)
    return module.pipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=["d3po", "prdp", "reward_weighted", "diffusion_dpo"], default="d3po")
    ap.add_argument("--images-per-prompt", type=int, default=8)
    ap.add_argument("--set", action="append", default=[], help="params override, e.g. finetune.d3po.lr=1e-4")
    ap.add_argument("--control", type=float, default=None, help="continue pre-training for this many minutes")
    ap.add_argument("--pretraining-term-only", type=int, metavar="STEPS", default=None,
                    help="reward-weighted fine-tuning with every feedback weight zero, for STEPS steps (its control)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="online rounds: each samples and labels the previous round's model (see online_rounds)")
    ap.add_argument("--label-fraction", type=float, default=1.0,
                    help="label this share of the round's tasks: a random half, then --select picks the rest")
    ap.add_argument("--select", choices=["random", "disagreement"], default="random",
                    help="with --label-fraction: how the second half is chosen (disagreement: active selection)")
    ap.add_argument("--note", default=None, help="what this run's code does differently, shown in the efficacy table")
    ap.add_argument("--scratch", default=str(REPO / ".aligndiff" / "bench" / "efficacy"))
    args = ap.parse_args()
    if args.pretraining_term_only is not None and args.method != "reward_weighted":
        ap.error("--pretraining-term-only is the control of --method reward_weighted")
    if not 0 < args.label_fraction <= 1 or (args.label_fraction < 1 and (args.rounds or args.control is not None)):
        ap.error("--label-fraction: a share in (0, 1], for one feedback round")

    overrides = [f"generate.images_per_prompt={args.images_per_prompt}", f"finetune.method={args.method}", *args.set]
    project = scratch_project(Path(args.scratch), overrides)
    params = project.params
    torch.set_num_threads(params.finetune.threads)
    base = models.load_pipeline(models.resolve(project, "base"))
    base_version = models.model_version(models.resolve(project, "base"))
    base_alignment = alignment(base, params, seed=12345)

    start = time.monotonic()
    if args.control is not None:
        pipe, steps = continued_pretraining(project, args.control)
        result = {"method": "continued_pretraining", "steps": steps}
    elif args.pretraining_term_only is not None:
        pipe = pretraining_term_only(project, args.pretraining_term_only)
        result = {"method": "reward_weighted_pretraining_term_only", "steps": args.pretraining_term_only}
    elif args.rounds:
        result = {"method": args.method, **online_rounds(project, args.method, args.rounds, seed=12345)}
        pipe = models.load_pipeline(project.path(f"models/round-{args.rounds}"))
    else:
        result = {"method": args.method, **feedback_round(project, args.method, args.label_fraction, args.select)}
        pipe = models.load_pipeline(project.path("models/candidate"))
    result["wall_minutes"] = round((time.monotonic() - start) / 60, 2)
    result["overrides"] = overrides
    if args.note:
        result["note"] = args.note
    result["base_version"] = base_version
    result["base"] = base_alignment
    result["tuned"] = alignment(pipe, params, seed=12345)
    result["gain_points"] = {split: round(100 * (result["tuned"][split]["aligned"] - base_alignment[split]["aligned"]), 1)
                             for split in ("seen", "unseen")}
    # all-four-right hides which attribute moved: caption noise affects count and background
    result["attribute_gain_points"] = {
        split: {attr: round(100 * (result["tuned"][split][attr] - base_alignment[split][attr]), 1)
                for attr in ("count", "colour", "shape", "background")}
        for split in ("seen", "unseen")}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if args.rounds:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        write_curve(result["curve"], base_alignment, RESULTS.parent / f"rounds-{args.method}-{stamp}",
                    f"{args.method}, {args.rounds} online rounds")
    with open(RESULTS, "a") as fh:
        fh.write(json.dumps(result, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("method", "wall_minutes", "gain_points", "attribute_gain_points")}))
    print(json.dumps({"base": base_alignment, "tuned": result["tuned"]}))


if __name__ == "__main__":
    main()
