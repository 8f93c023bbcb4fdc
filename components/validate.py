"""`validate` stage: Great Expectations gates on every dataset the training stages consume.

The suites are code (below): each check is a GX expectation plus the one line a person
reads when it fails (``labels: agreement 0.31 < 0.40 (validate.min_agreement)``).
Facts GX cannot see in a table — whether an object exists in the store, whether an
image decodes, a snapshot's agreement — are computed first as derived columns or a
one-row summary table, so every verdict, passed or failed, is in the Data Docs.

Datasets: ``prompts`` (data/prompts.parquet), ``generations`` (data/generations.parquet;
objects checked on a seeded sample of ``validate.sample_fraction``, all with ``--full``),
``labels`` (data/labels/: tasks and preferences). Writes ``reports/validation.json`` and
Data Docs under ``<state>/gx`` (git-ignored). Run as a stage: ``python -m components.validate``.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from components import feedback
from components.annotation.snapshot import LABELS_DIR, krippendorff_alpha
from components.errors import UserError
from components.project import Project
from components.stage import report_errors

REPORT_OUT = Path("reports/validation.json")
DATASETS = ("prompts", "generations", "labels")
LABEL_DOMAIN = {"binary": ["good", "bad", "tie"], "pairwise": ["left", "right", "tie"]}


@dataclass
class Check:
    """One expectation and the line that explains its failure."""
    table: str  # which frame of the dataset it runs on
    expectation: object
    explain: Callable[[dict], str]


@dataclass
class Suite:
    dataset: str
    tables: dict[str, pd.DataFrame]
    checks: list[Check] = field(default_factory=list)


def _examples(result: dict) -> str:
    values = list(dict.fromkeys(map(str, result.get("partial_unexpected_list") or [])))[:3]
    return f" (e.g. {', '.join(values)})" if values else ""


def _count(what: str, examples: bool = True) -> Callable[[dict], str]:
    """"N <what> (e.g. a, b)"; derived flag/count columns have no examples worth showing."""
    return lambda r: f"{r.get('unexpected_count', 0)} {what}{_examples(r) if examples else ''}"


def _below(label: str, threshold: float, param: str, above: bool = False) -> Callable[[dict], str]:
    def explain(r: dict) -> str:
        value = (r.get("partial_unexpected_list") or ["n/a"])[0]
        value = f"{value:.2f}" if isinstance(value, float) else str(value)
        sign = ">" if above else "<"
        return f"{label} {value} {sign} {threshold:g} ({param})"
    return explain


# ---- the suites -----------------------------------------------------------------------

def prompts_suite(prompts: pd.DataFrame, params) -> Suite:
    import great_expectations.expectations as gxe

    v, c = params.validation, params.curate
    normalised = prompts["text"].fillna("").str.lower().str.split().str.join(" ")
    splits = prompts.assign(norm=normalised).groupby("norm")["split"].transform("nunique")
    table = prompts.assign(splits_per_text=splits, category=prompts["category"].fillna(""))
    checks = [
        Check("prompts", gxe.ExpectColumnValuesToNotBeNull(column="id"), _count("prompts without an id")),
        Check("prompts", gxe.ExpectColumnValuesToBeUnique(column="id"), _count("rows share an id")),
        Check("prompts", gxe.ExpectColumnValuesToNotBeNull(column="text"), _count("prompts without text")),
        Check("prompts", gxe.ExpectColumnValuesToBeUnique(column="text"), _count("rows repeat a prompt text")),
        Check("prompts", gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=c.min_chars,
                                                                  max_value=c.max_chars),
              _count(f"texts outside {c.min_chars}–{c.max_chars} characters (curate.min_chars/max_chars)")),
        Check("prompts", gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "eval"]),
              _count("rows with a split other than train/eval")),
        Check("prompts", gxe.ExpectColumnValuesToBeBetween(column="splits_per_text", max_value=1),
              _count("prompts in both train and eval", examples=False)),
    ]
    if v.categories:
        checks.append(Check("prompts", gxe.ExpectColumnValuesToBeInSet(column="category", value_set=v.categories),
                            _count("prompts with a category outside validate.categories")))
    else:
        checks.append(Check("prompts", gxe.ExpectColumnValueLengthsToBeBetween(column="category", min_value=1),
                            _count("prompts without a category")))
    return Suite("prompts", {"prompts": table}, checks)


def object_checks(gens: pd.DataFrame, store, fraction: float, seed: int, image_size: int | None) -> pd.DataFrame:
    """The sampled rows with image_exists, trajectory_exists, image_ok (decodes, RGB, expected size)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    n = len(gens) if fraction >= 1 else max(1, round(fraction * len(gens))) if len(gens) else 0
    rows = gens.iloc[np.sort(np.random.default_rng(seed).choice(len(gens), size=n, replace=False))] if n else gens

    def inspect(row) -> tuple[bool, bool, str]:
        exists_t = store.exists(row.trajectory_key)
        if not store.exists(row.image_key):
            return False, exists_t, ""
        try:
            image = Image.open(io.BytesIO(store.get_bytes(row.image_key)))
            image.load()
        except Exception:  # PIL raises many types for bad bytes; the verdict is the same
            return True, exists_t, f"{row.image_key}: does not decode"
        size_ok = image_size is None or image.size == (image_size, image_size)
        problem = "" if image.mode == "RGB" and size_ok else f"{row.image_key}: {image.mode} {image.size[0]}×{image.size[1]}"
        return True, exists_t, problem

    with ThreadPoolExecutor(8) as pool:
        verdicts = list(pool.map(inspect, rows.itertuples()))
    return rows.assign(image_exists=[v[0] for v in verdicts], trajectory_exists=[v[1] for v in verdicts],
                       image_problem=[v[2] for v in verdicts])


def generations_suite(gens: pd.DataFrame, prompts: pd.DataFrame, objects: pd.DataFrame) -> Suite:
    import great_expectations.expectations as gxe

    def sampler_ok(text) -> bool:
        try:
            return {"steps", "guidance_scale", "eta"} <= set(json.loads(text))
        except (TypeError, ValueError):
            return False

    table = gens.assign(sampler_ok=gens["sampler"].map(sampler_ok))
    checks = [Check("generations", gxe.ExpectColumnValuesToNotBeNull(column="generation_id"),
                    _count("generations without an id")),
              Check("generations", gxe.ExpectColumnValuesToBeUnique(column="generation_id"),
                    _count("rows share a generation id")),
              Check("generations", gxe.ExpectColumnValuesToBeInSet(column="prompt_id", value_set=list(prompts["id"])),
                    _count("generations of a prompt id not in data/prompts.parquet"))]
    for column in ("seed", "init_seed", "image_key", "trajectory_key"):
        checks.append(Check("generations", gxe.ExpectColumnValuesToNotBeNull(column=column),
                            _count(f"generations without {column}")))
    checks += [
        Check("generations", gxe.ExpectColumnValuesToBeInSet(column="sampler_ok", value_set=[True]),
              _count("generations without sampler settings (JSON with steps, guidance_scale, eta)", examples=False)),
        Check("objects", gxe.ExpectColumnValuesToBeInSet(column="image_exists", value_set=[True]),
              _count("images missing from the object store", examples=False)),
        Check("objects", gxe.ExpectColumnValuesToBeInSet(column="trajectory_exists", value_set=[True]),
              _count("trajectories missing from the object store", examples=False)),
        Check("objects", gxe.ExpectColumnValuesToBeInSet(column="image_problem", value_set=[""]),
              _count("images that do not decode as RGB of the expected size")),
    ]
    return Suite("generations", {"generations": table, "objects": objects.drop(columns=["sampler"])}, checks)


def labels_suite(tasks: pd.DataFrame, prefs: pd.DataFrame, annotations: pd.DataFrame, gens: pd.DataFrame,
                 params) -> Suite:
    import great_expectations.expectations as gxe

    v = params.validation
    known = set(gens.index)
    task_table = tasks.assign(
        unknown_ids=[sum(g not in known for g in ids) for ids in tasks["generation_ids"]],
        in_domain=[m in LABEL_DOMAIN.get(k, []) or (k == "best_of_k" and (m == "tie" or m.startswith("image ")))
                   for k, m in zip(tasks["kind"], tasks["majority"])])
    pref_table = prefs.assign(same_image=prefs["winner"] == prefs["loser"],
                              unknown_ids=(~prefs["winner"].isin(known)).astype(int) + (~prefs["loser"].isin(known)))
    votes = [(t, choice) for t, vs in zip(tasks["task_id"], tasks["votes"]) for choice, n in json.loads(vs).items()
             for _ in range(n)]
    alpha = krippendorff_alpha(pd.DataFrame(votes, columns=["task_id", "choice"])) if votes else None
    binary = tasks[(tasks["kind"] == "binary") & tasks["majority"].isin(["good", "bad"])]
    summary = pd.DataFrame([{
        "labels": len(votes),
        "agreement": alpha if alpha is not None else -1.0,
        "good_share": float((binary["majority"] == "good").mean()) if len(binary) else 0.5,
    }])
    checks = [
        # one vote per annotation: a repeated id would count one person's label twice
        Check("annotations", gxe.ExpectColumnValuesToBeUnique(column="annotation_id"),
              _count("annotations share an annotation id")),
        Check("tasks", gxe.ExpectColumnValuesToBeInSet(column="kind", value_set=["binary", "pairwise", "best_of_k"]),
              _count("tasks of an unknown kind")),
        Check("tasks", gxe.ExpectColumnValuesToBeInSet(column="in_domain", value_set=[True]),
              _count("tasks whose label is outside their kind's choices", examples=False)),
        Check("tasks", gxe.ExpectColumnValuesToBeBetween(column="unknown_ids", max_value=0),
              _count("tasks naming generations not in data/generations.parquet", examples=False)),
        Check("tasks", gxe.ExpectColumnValuesToBeBetween(column="annotators", min_value=v.min_annotators),
              _count(f"tasks with fewer than {v.min_annotators} annotators (validate.min_annotators)", examples=False)),
        Check("preferences", gxe.ExpectColumnValuesToBeInSet(column="same_image", value_set=[False]),
              _count("preference pairs compare an image with itself", examples=False)),
        Check("preferences", gxe.ExpectColumnValuesToBeBetween(column="unknown_ids", max_value=0),
              _count("preference pairs naming generations not in data/generations.parquet", examples=False)),
        Check("preferences", gxe.ExpectColumnValuesToBeBetween(column="weight", min_value=0, max_value=1),
              _count("preference weights outside [0, 1]")),
        Check("summary", gxe.ExpectColumnValuesToBeBetween(column="labels", min_value=v.min_labels),
              _below("labels", v.min_labels, "validate.min_labels")),
        Check("summary", gxe.ExpectColumnValuesToBeBetween(column="agreement", min_value=v.min_agreement),
              _below("agreement", v.min_agreement, "validate.min_agreement")),
        Check("summary", gxe.ExpectColumnValuesToBeBetween(column="good_share", min_value=v.min_good_share),
              _below("good share", v.min_good_share, "validate.min_good_share")),
        Check("summary", gxe.ExpectColumnValuesToBeBetween(column="good_share", max_value=v.max_good_share),
              _below("good share", v.max_good_share, "validate.max_good_share", above=True)),
    ]
    return Suite("labels", {"annotations": annotations[["annotation_id", "task_id"]], "tasks": task_table,
                            "preferences": pref_table, "summary": summary}, checks)


# ---- running them ---------------------------------------------------------------------

def run_suites(suites: list[Suite], docs_root: Path) -> dict:
    """Validate with GX (file context under ``docs_root``, Data Docs rebuilt); the summary."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", project_root_dir=str(docs_root))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_or_update_pandas("aligndiff")
    summary: dict = {}
    for suite in suites:
        failures, evaluated = [], 0
        for table_name, frame in suite.tables.items():
            name = f"{suite.dataset}.{table_name}"
            checks = [c for c in suite.checks if c.table == table_name]
            asset = next((a for a in source.assets if a.name == name), None) or source.add_dataframe_asset(name)
            batch = next((b for b in asset.batch_definitions if b.name == "whole"), None) or \
                asset.add_batch_definition_whole_dataframe("whole")
            gx_suite = context.suites.add_or_update(gx.ExpectationSuite(
                name=name, expectations=[c.expectation for c in checks]))
            definition = context.validation_definitions.add_or_update(
                gx.ValidationDefinition(name=name, data=batch, suite=gx_suite))
            checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
                name=name, validation_definitions=[definition],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")]))
            result = checkpoint.run(batch_parameters={"dataframe": frame})
            for run in result.run_results.values():
                evaluated += len(run.results)
                for check, outcome in zip(checks, run.results):
                    if not outcome.success:
                        failures.append(f"{suite.dataset}: {check.explain(outcome.result)}")
        summary[suite.dataset] = {"success": not failures, "expectations": evaluated, "failures": failures,
                                  "rows": {k: int(len(v)) for k, v in suite.tables.items()}}
    docs = context.get_docs_sites_urls()
    return {"success": all(s["success"] for s in summary.values()), "datasets": summary,
            "data_docs": docs[0]["site_url"] if docs else None}


def build_suites(project: Project, datasets: list[str], full: bool) -> list[Suite]:
    params, root = project.params, project.root
    prompts = feedback.read_table(root, Path("data/prompts.parquet"), ["id", "text", "category", "split"],
                                  "run `dvc repro curate`")
    suites = []
    if "prompts" in datasets:
        suites.append(prompts_suite(prompts, params))
    if "generations" in datasets or "labels" in datasets:
        gens = feedback.generations(root)
    if "generations" in datasets:
        image_size = None
        if params.profile == "world":
            from components.world.render import IMAGE_SIZE

            image_size = IMAGE_SIZE
        fraction = 1.0 if full else params.validation.sample_fraction
        objects = object_checks(gens.reset_index(drop=True), project.object_store(), fraction, params.seed, image_size)
        suites.append(generations_suite(gens.reset_index(drop=True), prompts, objects))
    if "labels" in datasets:
        tasks = feedback.read_table(root, feedback.TASKS, ["task_id", "kind", "generation_ids", "majority", "votes",
                                                           "annotators"], "run `aligndiff annotate snapshot`")
        prefs = feedback.read_table(root, feedback.PREFERENCES, ["prompt", "winner", "loser", "weight"],
                                    "run `aligndiff annotate snapshot`")
        annotations = feedback.read_table(root, LABELS_DIR / "annotations.parquet", ["annotation_id", "task_id"],
                                          "run `aligndiff annotate snapshot`")
        suites.append(labels_suite(tasks, prefs, annotations, gens, params))
    return suites


def validate(project: Project, datasets: list[str] | None = None, full: bool = False) -> dict:
    datasets = list(datasets or DATASETS)
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown:
        raise UserError(f"unknown dataset {unknown[0]!r}; expected one of {', '.join(DATASETS)}")
    summary = run_suites(build_suites(project, datasets, full), project.state_dir / "gx")
    return summary


def failure_lines(summary: dict) -> list[str]:
    lines = [f for s in summary["datasets"].values() for f in s["failures"]]
    return lines + ([f"Data Docs: {summary['data_docs']}"] if lines and summary.get("data_docs") else [])


def report(project: Project, datasets: list[str] | None = None, full: bool = False) -> int:
    """Validate, write reports/validation.json; failures to stderr, one line each, then the Data Docs path."""
    try:
        summary = validate(project, datasets, full)
    except UserError as exc:
        report_errors([f"validate: error: {exc}"])
        return exc.exit_code
    out = project.path(REPORT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"success": summary["success"], "datasets": summary["datasets"]}, indent=2) + "\n")
    if not summary["success"]:
        report_errors(failure_lines(summary))
        return 1
    counts = ", ".join(f"{n}: {s['expectations']} expectations" for n, s in summary["datasets"].items())
    print(f"validate: all valid ({counts}); Data Docs: {summary['data_docs']}")
    return 0


def main() -> int:
    project = Project.load(".")
    return report(project, full=project.params.validation.full_check)


if __name__ == "__main__":
    sys.exit(main())
