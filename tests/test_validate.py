"""Great Expectations gates: clean datasets pass; each broken one fails with its own line."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components import curate, feedback, validate
from components.annotation import oracle
from components.annotation.snapshot import LABELS_DIR
from components.annotation.simulate import AnnotatorConfig
from components.project import Project
from components.world.grammar import parse_prompt
from components.world.render import render
from flows.cli import main as cli
from tests.conftest import sibling_project


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def project(stack_project, tmp_path_factory):
    """96 curated prompts, 2 renders for each of 24 of them in the real S3, judge-made labels.

    One render of each pair shows a different count, so labels are balanced and agree."""
    root = sibling_project(stack_project, tmp_path_factory.mktemp("validate") / "project")
    curate.run(root)
    project = Project.load(root)
    store = project.object_store()
    prompts = pd.read_parquet(root / "data" / "prompts.parquet").sort_values("id").head(24)
    rows, images = [], {}
    rng = np.random.default_rng(0)
    for p in prompts.itertuples():
        comp = parse_prompt(p.text)
        wrong = comp.with_value("count", "two" if comp.count != 2 else "three")
        for k, shown in enumerate((comp, wrong)):
            image = render(shown, rng)
            gid = f"{p.id}-{k}"
            images[gid] = image
            rows.append({"generation_id": gid, "prompt_id": p.id, "prompt": p.text, "split": p.split,
                         "model_version": "test", "seed": k, "init_seed": 0, "noise_group": 0,
                         "sampler": json.dumps({"steps": 3, "guidance_scale": 3.0, "eta": 1.0}),
                         "image_key": store.put_bytes(_png(image), "images", ".png"),
                         "trajectory_key": store.put_bytes(f"trajectory {gid}".encode(), "trajectories")})
    gens = pd.DataFrame(rows)
    gens.to_parquet(root / "data" / "generations.parquet", index=False)
    tasks, prefs = oracle.label(gens.set_index("generation_id", drop=False), images,
                                AnnotatorConfig(coverage=3, flip_rate=0.05))
    oracle.write(tasks, prefs, root / "data" / "labels")
    return project


def _tables(project):
    root = project.root
    return (pd.read_parquet(root / "data" / "prompts.parquet"), feedback.generations(root),
            pd.read_parquet(root / feedback.TASKS), pd.read_parquet(root / feedback.PREFERENCES),
            pd.read_parquet(root / LABELS_DIR / "annotations.parquet"))


def _params(project, **validate_overrides):
    return project.params.model_copy(update={"validation": project.params.validation.model_copy(
        update=validate_overrides)})


def test_clean_datasets_pass_and_data_docs_list_every_suite(project):
    summary = validate.validate(project, full=True)
    assert summary["success"], validate.failure_lines(summary)
    assert summary["datasets"]["generations"]["rows"]["objects"] == 48
    docs = project.state_dir / "gx" / "gx" / "uncommitted" / "data_docs" / "local_site"
    index = (docs / "index.html").read_text()
    for suite in ("prompts.prompts", "generations.generations", "generations.objects", "labels.annotations",
                  "labels.tasks", "labels.preferences", "labels.summary"):
        assert suite in index


def _run(project, suite) -> list[str]:
    summary = validate.run_suites([suite], project.state_dir / "gx-broken")
    return validate.failure_lines(summary)[:-1]  # the last line is the Data Docs path


def _dup_id(p):
    p.loc[1, "id"] = p.loc[0, "id"]


def _short_text(p):
    p.loc[0, "text"] = "hi"


def _bad_split(p):
    p.loc[0, "split"] = "test"


def _leak(p):
    p.loc[0, "text"] = p.loc[1, "text"].upper()
    p.loc[0, "split"], p.loc[1, "split"] = "train", "eval"


@pytest.mark.parametrize("breaker, message", [
    (_dup_id, "prompts: 2 rows share an id"),
    (_short_text, "prompts: 1 texts outside 3–300 characters (curate.min_chars/max_chars)"),
    (_bad_split, "prompts: 1 rows with a split other than train/eval (e.g. test)"),
    (_leak, "prompts: 2 prompts in both train and eval"),
])
def test_broken_prompts_fail_with_their_own_message(project, breaker, message):
    prompts = _tables(project)[0].copy()
    breaker(prompts)
    lines = _run(project, validate.prompts_suite(prompts, project.params))
    assert any(line.startswith(message) for line in lines), lines


def test_broken_generations_fail_with_their_own_message(project):
    prompts, gens, *_ = _tables(project)
    gens = gens.reset_index(drop=True)
    store = project.object_store()
    gens.loc[0, "prompt_id"] = "0000000000000000"
    gens.loc[1, "image_key"] = "images/00/missing.png"
    gens.loc[2, "trajectory_key"] = "trajectories/00/missing"
    gens.loc[3, "image_key"] = store.put_bytes(b"not a png", "images", ".png")
    gens.loc[4, "image_key"] = store.put_bytes(_png(np.zeros((16, 16, 3), np.uint8)), "images", ".png")
    gens.loc[5, "sampler"] = "{}"
    objects = validate.object_checks(gens, store, 1.0, 0, 32)
    lines = _run(project, validate.generations_suite(gens, prompts, objects))
    expected = ["generations: 1 generations of a prompt id not in data/prompts.parquet",
                "generations: 1 images missing from the object store",
                "generations: 1 trajectories missing from the object store",
                "generations: 2 images that do not decode as RGB of the expected size",
                "generations: 1 generations without sampler settings"]
    for message in expected:
        assert any(line.startswith(message) for line in lines), (message, lines)
    assert len(lines) == len(expected)


def test_objects_are_checked_on_a_seeded_sample_unless_full(project):
    _, gens, *_ = _tables(project)
    store = project.object_store()
    sample = validate.object_checks(gens.reset_index(drop=True), store, 0.25, 7, 32)
    again = validate.object_checks(gens.reset_index(drop=True), store, 0.25, 7, 32)
    assert len(sample) == 12 and sample["generation_id"].tolist() == again["generation_id"].tolist()


def _unknown_generation(tasks, prefs):
    tasks.at[0, "generation_ids"] = ["nope"]


def _same_image(tasks, prefs):
    prefs.loc[0, "loser"] = prefs.loc[0, "winner"]


def _outside_domain(tasks, prefs):
    tasks.loc[0, "majority"] = "maybe"


def _few_annotators(tasks, prefs):
    tasks.loc[0, "annotators"] = 1


@pytest.mark.parametrize("breaker, overrides, message", [
    (_unknown_generation, {}, "labels: 1 tasks naming generations not in data/generations.parquet"),
    (_same_image, {}, "labels: 1 preference pairs compare an image with itself"),
    (_outside_domain, {}, "labels: 1 tasks whose label is outside their kind's choices"),
    (_few_annotators, {"min_annotators": 2}, "labels: 1 tasks with fewer than 2 annotators (validate.min_annotators)"),
    (None, {"min_agreement": 0.99}, "labels: agreement 0."),
    (None, {"max_good_share": 0.2}, "labels: good share 0."),
    (None, {"min_good_share": 0.9}, "labels: good share 0."),
    (None, {"min_labels": 10**6}, "labels: labels "),
])
def test_broken_labels_fail_with_their_own_message(project, breaker, overrides, message):
    _, gens, tasks, prefs, annotations = _tables(project)
    if breaker:
        breaker(tasks, prefs)
    lines = _run(project, validate.labels_suite(tasks, prefs, annotations, gens, _params(project, **overrides)))
    assert len(lines) == 1 and lines[0].startswith(message), lines
    if overrides:
        param = next(iter(overrides))
        assert lines[0].endswith(f"(validate.{param})")


def test_an_annotation_stored_twice_fails_validation(project):
    """Duplicated annotation ids in a snapshot would count one person's vote twice."""
    _, gens, tasks, prefs, annotations = _tables(project)
    doubled = pd.concat([annotations, annotations.iloc[[3]]], ignore_index=True)
    lines = _run(project, validate.labels_suite(tasks, prefs, doubled, gens, _params(project)))
    assert lines == [f"labels: 2 annotations share an annotation id (e.g. {annotations.iloc[3]['annotation_id']})"]


def test_cli_exits_non_zero_with_one_line_per_failure_then_the_docs(project, capsys, monkeypatch):
    broken = pd.read_parquet(project.root / feedback.PREFERENCES)
    good = broken.copy()
    broken.loc[0, "loser"] = broken.loc[0, "winner"]
    broken.to_parquet(project.root / feedback.PREFERENCES, index=False)
    try:
        code = cli(["--project", str(project.root), "validate", "labels"])
    finally:
        good.to_parquet(project.root / feedback.PREFERENCES, index=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[0] == "labels: 1 preference pairs compare an image with itself"
    assert err[-1].startswith("Data Docs: file://") and err[-1].endswith("index.html")
    report = json.loads((project.root / "reports" / "validation.json").read_text())
    assert report["success"] is False and report["datasets"]["labels"]["failures"] == [err[0]]

    assert cli(["--project", str(project.root), "validate", "nonsense"]) == 1
    assert "unknown dataset 'nonsense'" in capsys.readouterr().err
