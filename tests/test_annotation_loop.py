"""Push → simulated annotators → sync, against the real Label Studio and S3."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.annotation import simulate as sim
from components.annotation import studio
from components.annotation.labeling import make_result
from components.annotation.sync import store_for, sync, verify
from components.errors import ServiceError
from components.generate import png_bytes
from components.world.grammar import all_compositions
from components.world.judge import judge
from components.world.render import render


def _world_pairs(store, n: int, seed: int) -> tuple[list[studio.TaskSpec], dict]:
    """n pairwise tasks: each prompt with one right image and one image of a near miss (or both right)."""
    rng = np.random.default_rng(seed)
    comps = all_compositions()
    specs, truth = [], {}
    for i in range(n):
        c = comps[int(rng.integers(len(comps)))]
        other = c if rng.random() < 0.2 else c.perturbations()[int(rng.integers(9))]
        images = [render(c, rng), render(other, rng)]
        if rng.random() < 0.5:
            images.reverse()
        keys = tuple(store.put_bytes(png_bytes(im), "images", ".png", content_type="image/png") for im in images)
        spec = studio.TaskSpec(prompt=c.prompt, generation_ids=(f"s{seed}-{i}-a", f"s{seed}-{i}-b"), image_keys=keys)
        left, right = (judge(im, c).score for im in images)
        truth[studio.external_id(spec.generation_ids)] = "tie" if left == right else ("left" if left > right else "right")
        specs.append(spec)
    return specs, truth


@pytest.fixture(scope="module")
def round_project(stack_project, tmp_path_factory):
    """A project of its own (own Label Studio namespace and store) on the session's services."""
    from components.project import Project
    from tests.conftest import sibling_project

    return Project.load(sibling_project(stack_project, tmp_path_factory.mktemp("loop") / "round"))


@pytest.fixture(scope="module")
def labelled_round(round_project):
    """200 pairwise tasks, 3 simulated annotators each, synced once."""
    client = studio.client_for(round_project)
    project_id = studio.ensure_project(client, round_project, "pairwise")
    specs, truth = _world_pairs(round_project.object_store(), 200, seed=1)
    pushed = studio.push_tasks(client, round_project, project_id, specs)
    config = sim.AnnotatorConfig(annotators=3, coverage=3, flip_rate=0.2, seed=3)
    simulated = sim.simulate(round_project, project_id, "pairwise", config, client=client)
    progress = []
    first = sync(round_project, project_id, "pairwise", client=client, on_progress=lambda *p: progress.append(p))
    return {"client": client, "project_id": project_id, "specs": specs, "truth": truth, "pushed": pushed,
            "simulated": simulated, "first_sync": first, "sync_progress": progress}


@pytest.mark.slow
def test_200_tasks_3_annotators_give_exactly_600_annotations_and_reruns_add_nothing(round_project, labelled_round):
    r = labelled_round
    assert r["pushed"].created == 200 and r["simulated"]["submitted"] == 600
    assert r["first_sync"]["new"] == 600 and r["first_sync"]["rejected"] == 0
    assert r["sync_progress"][0] == (1, 200) and r["sync_progress"][-1] == (200, 200)
    store = store_for(round_project, r["project_id"])
    rows = store.annotations()
    assert len(rows) == 600 and rows["annotation_id"].is_unique
    assert (rows.groupby("task_id").size() == 3).all() and rows["annotator"].nunique() == 3
    assert (rows["status"] == "submitted").all() and rows["critique"].str.contains("left:").all()

    # tasks are labelled concurrently; each vote is still its annotator's own seeded draw for that task
    config = sim.AnnotatorConfig(annotators=3, coverage=3, flip_rate=0.2, seed=3)
    user_ids = dict(zip((f"annotator-{i}@{sim.ANNOTATOR_DOMAIN}" for i in (1, 2, 3)),
                        sim.ensure_annotators(r["client"], 3)))
    keys = {studio.external_id(s.generation_ids): s.image_keys for s in r["specs"]}
    images = {key: np.array(Image.open(io.BytesIO(round_project.object_store().get_bytes(key))).convert("RGB"))
              for pair in keys.values() for key in pair}
    for row in rows.itertuples():
        verdicts = [judge(images[key], row.prompt) for key in keys[row.external_id]]
        expected, _ = sim.decide("pairwise", verdicts, sim._rng(config.seed, row.task_id, user_ids[row.annotator]),
                                 config)
        assert row.choice == expected, row

    again = studio.push_tasks(r["client"], round_project, r["project_id"], r["specs"])
    assert again.created == 0
    assert sim.simulate(round_project, r["project_id"], "pairwise", sim.AnnotatorConfig(seed=3),
                        client=r["client"])["submitted"] == 0
    second = sync(round_project, r["project_id"], "pairwise", client=r["client"])
    assert second["new"] == 0 and len(store.annotations()) == 600


@pytest.mark.slow
def test_simulated_labels_agree_with_the_judge_at_the_configured_noise(round_project, labelled_round):
    rows = store_for(round_project, labelled_round["project_id"]).annotations()
    truth = labelled_round["truth"]
    decisive = rows[rows["external_id"].map(truth) != "tie"]
    agreement = (decisive["choice"] == decisive["external_id"].map(truth)).mean()
    assert abs(agreement - 0.8) < 0.06  # flip_rate 0.2 on ≈ 480 decisive labels
    ties = rows[rows["external_id"].map(truth) == "tie"]
    assert (ties["choice"] == "tie").all()


@pytest.mark.slow
def test_edits_replace_deletions_are_marked_and_malformed_results_are_rejected(round_project, labelled_round):
    r = labelled_round
    client, project_id = r["client"], r["project_id"]
    store = store_for(round_project, project_id)
    rows = store.annotations()
    edited, removed = rows.iloc[0], rows.iloc[1]
    new_choice = "right" if edited["choice"] != "right" else "left"
    client.annotations.update(id=int(edited["annotation_id"]), result=make_result("pairwise", new_choice, "changed my mind"))
    client.annotations.delete(id=int(removed["annotation_id"]))
    bad_task = int(rows.iloc[5]["task_id"])
    bad = client.annotations.create(id=bad_task, result=[
        {"from_name": "choice", "to_name": "image_0", "type": "choices", "value": {"choices": ["both"]}}])
    critique_only = client.annotations.create(id=int(rows.iloc[8]["task_id"]), result=[
        {"from_name": "critique", "to_name": "image_0", "type": "textarea", "value": {"text": ["no choice"]}}])
    # a task someone imported by hand, not through an aligndiff push
    foreign_task = client.tasks.create(project=project_id, data={"image_0": "s3://elsewhere/a.png",
                                                                 "image_1": "s3://elsewhere/b.png", "prompt": "x"})
    foreign = client.annotations.create(id=foreign_task.id, result=make_result("pairwise", "left"))

    withdrawn = rows.iloc[2]  # once a valid label, then edited into one the config does not allow
    client.annotations.update(id=int(withdrawn["annotation_id"]), result=[
        {"from_name": "choice", "to_name": "image_0", "type": "choices", "value": {"choices": ["neither"]}}])
    used_later = set(rows.iloc[:20]["task_id"])
    deleted_task = next(t for t in rows["task_id"][::-1] if t not in used_later)
    client.tasks.delete(id=int(deleted_task))

    result = sync(round_project, project_id, "pairwise", client=client)
    assert result["rejected"] == 4 and result["deleted"] == 1 + 3  # one annotation, and a task's three
    after = store.annotations().set_index("annotation_id")
    assert after["status"].value_counts().to_dict() == {"submitted": 600 - 1 - 1 - 3, "deleted": 4, "rejected": 3}
    assert after.loc[edited["annotation_id"], "choice"] == new_choice
    assert after.loc[edited["annotation_id"], "critique"] == "changed my mind"
    assert after.loc[removed["annotation_id"], "status"] == "deleted"
    assert (after.loc[after["task_id"] == deleted_task, "status"] == "deleted").all()
    assert after.loc[withdrawn["annotation_id"], "status"] == "rejected"
    assert pd.isna(after.loc[withdrawn["annotation_id"], "choice"])
    assert after.loc[bad.id, "status"] == "rejected" and len(after) == 602
    reasons = store.rejected().set_index("annotation_id")["reason"]
    assert "unknown choice 'both'" in reasons.loc[bad.id]
    assert "missing the required choice" in reasons.loc[critique_only.id]
    assert "not pushed by aligndiff" in reasons.loc[foreign.id]
    assert after.loc[critique_only.id, "status"] == "rejected" and foreign.id not in after.index
    assert verify(client, store, project_id, "pairwise", 2)["equal"]


@pytest.mark.slow
def test_label_studio_dying_mid_sync_changes_nothing_and_a_rerun_completes(stack_project, round_project,
                                                                          labelled_round):
    """The outage is real (the server process is stopped); the wrapper only chooses the moment."""
    from infra.stack import Stack

    r = labelled_round
    client, project_id = r["client"], r["project_id"]
    store = store_for(round_project, project_id)
    rows = store.annotations()
    for annotation_id in rows["annotation_id"].iloc[10:14]:
        client.annotations.update(id=int(annotation_id), result=make_result("pairwise", "tie", "on reflection"))
    before = (store.annotations_path.read_bytes(), store.watermark())

    stack = Stack(stack_project)

    class StopsServerAfterFirstPage:
        """Pages of two tasks; the server goes down once the first page has been read."""

        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def list(self, **kwargs):
            page = self._inner.list(**{**kwargs, "page_size": 2})
            stack._stop("label_studio")
            return page

    class Client:
        def __getattr__(self, name):
            return getattr(client, name)

        tasks = StopsServerAfterFirstPage(client.tasks)

    with pytest.raises(ServiceError, match="became unreachable during sync"):
        sync(round_project, project_id, "pairwise", client=Client())
    assert (store.annotations_path.read_bytes(), store.watermark()) == before

    stack.up()
    result = sync(round_project, project_id, "pairwise", client=studio.client_for(round_project))
    assert result["upserted"] >= 4
    after = store.annotations().set_index("annotation_id")
    assert (after.loc[rows["annotation_id"].iloc[10:14], "choice"] == "tie").all()
    assert len(after) == 602
