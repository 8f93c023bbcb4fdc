"""Label snapshot: aggregation, agreement, preference pairs, Pick-a-Pic conversion."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from components.annotation import snapshot
from components.annotation.store import AnnotationStore


def _row(aid, task, choice, annotator, gens, prompt="p", status="submitted"):
    return {"annotation_id": aid, "task_id": task, "project_id": 1, "external_id": f"e{task}",
            "generation_ids": gens, "prompt": prompt, "annotator": annotator, "choice": choice, "critique": "",
            "status": status, "created_at": "2026-01-01T00:00:00+00:00", "updated_at": "2026-01-01T00:00:00+00:00"}


@pytest.fixture
def state(tmp_path):
    pairwise = [
        _row(1, 10, "left", "a", ["g1", "g2"], "two red squares"), _row(2, 10, "left", "b", ["g1", "g2"], "two red squares"),
        _row(3, 10, "right", "c", ["g1", "g2"], "two red squares"),
        _row(4, 11, "left", "a", ["g3", "g4"]), _row(5, 11, "right", "b", ["g3", "g4"]), _row(6, 11, "tie", "c", ["g3", "g4"]),
        _row(7, 12, "right", "a", ["g5", "g6"]), _row(8, 12, "left", "b", ["g5", "g6"], status="deleted"),
        _row(9, 12, None, "c", ["g5", "g6"], status="skipped"),
    ]
    binary = [
        _row(20, 30, "good", "a", ["b1"], "one blue circle"), _row(21, 30, "good", "b", ["b1"], "one blue circle"),
        _row(22, 31, "bad", "a", ["b2"], "one blue circle"), _row(23, 31, "bad", "b", ["b2"], "one blue circle"),
        _row(24, 32, "bad", "a", ["b3"], "one blue circle"),
    ]
    best_of_3 = [_row(40, 50, "image 2", "a", ["k1", "k2", "k3"], "four yellow squares"),
                 _row(41, 50, "image 2", "b", ["k1", "k2", "k3"], "four yellow squares")]
    AnnotationStore(tmp_path / "annotations" / "3").commit(best_of_3, [], [], None)
    AnnotationStore(tmp_path / "annotations" / "1").commit(pairwise, [], [], None)
    AnnotationStore(tmp_path / "annotations" / "2").commit(binary, [], [], None)
    return tmp_path


def test_snapshot_aggregates_tasks_and_derives_preferences(state, tmp_path):
    report = snapshot.snapshot(state, tmp_path / "labels", tmp_path / "labels.json")
    assert report["annotations"] == 14 and report["skipped"] == 1  # 7 pairwise + 5 binary + 2 best-of-3
    tasks = pd.read_parquet(tmp_path / "labels" / "tasks.parquet").set_index("task_id")
    assert tasks.loc[10, "majority"] == "left" and tasks.loc[10, "majority_share"] == pytest.approx(2 / 3, abs=1e-3)
    assert tasks.loc[11, "majority"] == "tie"
    assert tasks.loc[12, "majority"] == "right" and tasks.loc[12, "annotators"] == 1
    prefs = pd.read_parquet(tmp_path / "labels" / "preferences.parquet")
    pairs = set(zip(prefs["winner"], prefs["loser"]))
    assert pairs == {("g1", "g2"), ("g6", "g5"), ("b1", "b2"), ("b1", "b3"), ("k2", "k1"), ("k2", "k3")}
    assert prefs.set_index("winner").loc["g1", "weight"] == pytest.approx(2 / 3, abs=1e-3)
    assert json.loads((tmp_path / "labels.json").read_text())["ties"] == 1



def test_snapshot_leaves_out_labels_of_images_the_current_generations_do_not_include(state, tmp_path):
    """After the base model or sampler changes, earlier images' labels stay in the stores
    but cannot be paired with the new generations (nor their trajectories replayed)."""
    current = {"g1", "g2", "g3", "g4", "g5", "g6", "b1", "b3"}  # b2 and the best-of-3 images came earlier
    report = snapshot.snapshot(state, tmp_path / "labels", tmp_path / "labels.json", generations=current)
    assert report["annotations"] == 10 and report["stale"] == 4
    prefs = pd.read_parquet(tmp_path / "labels" / "preferences.parquet")
    assert set(zip(prefs["winner"], prefs["loser"])) == {("g1", "g2"), ("g6", "g5"), ("b1", "b3")}
    assert len(snapshot.load_stores(state)[0]) == 14  # nothing removed from the stores

def test_krippendorff_alpha_matches_a_hand_computed_value():
    rows = [{"task_id": t, "choice": c} for t, pair in enumerate([("a", "a"), ("a", "b"), ("b", "b"), ("b", "b")])
            for c in pair]
    # n_a = 3, n_b = 5, D_o = 2, D_e = 2·3·5/7 → α = 1 − 2/(30/7) = 0.5333
    assert snapshot.krippendorff_alpha(pd.DataFrame(rows)) == pytest.approx(0.5333, abs=1e-4)
    perfect = pd.DataFrame([{"task_id": t, "choice": c} for t, c in enumerate("ab") for _ in range(3)])
    assert snapshot.krippendorff_alpha(perfect) == 1.0


def test_pickapic_round_trip():
    prefs = pd.DataFrame({"prompt": ["x", "y"], "winner": ["w1", "w2"], "loser": ["l1", "l2"], "weight": [1.0, 0.7],
                          "source_task": [1, 2]})
    images = {g: g.encode() * 3 for g in ["w1", "w2", "l1", "l2"]}
    table = snapshot.to_pickapic(prefs, images.__getitem__)
    assert list(table.columns) == ["caption", "jpg_0", "jpg_1", "label_0"]
    first, second = table.at[1, "jpg_0"], table.at[1, "jpg_1"]
    table.at[1, "jpg_0"], table.at[1, "jpg_1"], table.at[1, "label_0"] = second, first, 0.0  # same pair, other order
    tie = pd.DataFrame({"caption": ["z"], "jpg_0": [b"a"], "jpg_1": [b"b"], "label_0": [0.5]})
    back = snapshot.from_pickapic(pd.concat([table, tie], ignore_index=True),
                                  lambda b: hashlib.sha256(b).hexdigest()[:8])
    h = {g: hashlib.sha256(v).hexdigest()[:8] for g, v in images.items()}
    assert list(zip(back["winner"], back["loser"])) == [(h["w1"], h["l1"]), (h["w2"], h["l2"])]
    with pytest.raises(ValueError, match="missing columns"):
        snapshot.from_pickapic(pd.DataFrame({"caption": ["x"]}), str)
    with pytest.raises(ValueError, match="label_0 must be"):
        snapshot.from_pickapic(tie.assign(label_0=2), str)
