"""The curate stage: sources, normalisation, deduplication, filters, split, bad files."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from components import curate
from components.config import CurateParams
from components.errors import UserError
from tests.conftest import REPO


def _project(tmp_path, sources, **curate_params):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    tmp_path.mkdir(parents=True, exist_ok=True)
    params["curate"].update(sources=sources, **curate_params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def _outputs(root):
    return root / curate.PROMPTS_OUT, root / curate.REPORT_OUT


def test_world_source_gives_96_prompts_split_by_category(tmp_path):
    root = _project(tmp_path, ["world"])
    report = curate.run(root)
    prompts = pd.read_parquet(_outputs(root)[0])
    assert len(prompts) == 96 and prompts["id"].is_unique
    assert report["splits"] == {"eval": 24, "train": 72}
    unseen = prompts[prompts["category"] == "world/unseen"]
    assert len(unseen) == 24 and set(unseen["split"]) == {"train", "eval"}
    assert list(prompts.columns) == curate.COLUMNS
    assert "count:three" in prompts[prompts["text"] == "three red squares on a gray background"]["tags"].iloc[0]


def test_output_is_deterministic_and_ids_are_stable(tmp_path):
    a = _project(tmp_path / "a", ["world"])
    b = _project(tmp_path / "b", ["world"])
    curate.run(a)
    curate.run(b)
    assert _outputs(a)[0].read_bytes() == _outputs(b)[0].read_bytes()
    assert curate.prompt_id("one red circle on a white background") == curate.prompt_id(
        curate.normalise("  One RED circle on a   white background"))


def test_user_files_are_normalised_deduplicated_and_filtered(tmp_path):
    (tmp_path / "p.txt").write_text(
        "A  cat on a Mat\n"
        "a cat on a mat\n"          # exact duplicate after normalisation
        "mat a cat on a!\n"         # near duplicate: same words, other order, punctuation
        "ok\n"                      # too short (min_chars 3)
        "a violent scene\n"         # blocklisted
        "\n"
        "Ｆｕｌｌｗｉｄｔｈ text\n",    # NFKC folds full-width letters
        encoding="utf-8")
    (tmp_path / "q.csv").write_text("prompt,category\nA dog in the city,animals\nA CAT ON A MAT,animals\n")
    (tmp_path / "r.jsonl").write_text('{"prompt": "a red car", "category": "vehicles"}\n\n{"prompt": "a blue car"}\n')
    root = _project(tmp_path, ["p.txt", "q.csv", "r.jsonl"], blocklist=["Violent"])
    report = curate.run(root)
    prompts = pd.read_parquet(_outputs(root)[0])
    assert sorted(prompts["text"]) == ["a blue car", "a cat on a mat", "a dog in the city", "a red car", "fullwidth text"]
    assert report["dropped"] == {"blocklisted": 1, "duplicate": 2, "near_duplicate": 1, "too_short": 1}
    assert dict(zip(prompts["text"], prompts["category"]))["a dog in the city"] == "animals"
    assert dict(zip(prompts["text"], prompts["category"]))["a blue car"] == "user"


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("bad.txt", b"fine line\nnot \xff utf-8\n", "bad.txt:2: not UTF-8 text"),
        ("bad.csv", b"text,category\nhello,x\n", "bad.csv:1: no 'prompt' column (found: text, category)"),
        ("empty.txt", b"\n\n", "empty.txt: no prompts in file"),
        ("long.txt", b"short\n" + b"x" * 5000 + b"\n", "long.txt:2: line is 5000 characters, more than curate.max_line_chars=4000"),
        ("bad.jsonl", b'{"prompt": "a"}\n{"prompt": \n', "bad.jsonl:2: invalid JSON"),
        ("bad2.jsonl", b'{"prompt": 3}\n', "bad2.jsonl:1: 'prompt' must be a string, got int"),
        ("bad.tsv", b"a\tb\n", "bad.tsv: unsupported prompt file type .tsv"),
    ],
)
def test_bad_files_give_one_line_naming_file_and_line_and_write_nothing(tmp_path, name, content, expected, capsys,
                                                                          monkeypatch):
    (tmp_path / name).write_bytes(content)
    root = _project(tmp_path, ["world", name])
    monkeypatch.chdir(root)
    assert curate.main() == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not any(p.exists() for p in _outputs(root))
    assert not list(root.rglob("*.tmp"))


def test_missing_file_is_named(tmp_path):
    root = _project(tmp_path, ["nope.txt"])
    with pytest.raises(UserError, match="nope.txt: prompt file not found"):
        curate.run(root)


def test_failed_run_keeps_previous_outputs(tmp_path):
    root = _project(tmp_path, ["world"])
    curate.run(root)
    before = [p.read_bytes() for p in _outputs(root)]
    (tmp_path / "bad.csv").write_text("caption\nx\n")
    _project(tmp_path, ["world", "bad.csv"])
    with pytest.raises(UserError):
        curate.run(root)
    assert [p.read_bytes() for p in _outputs(root)] == before


def test_split_is_stratified_and_seeded():
    prompts = [curate.Prompt(text=f"prompt number {i}", category="a" if i < 40 else "b", source="x") for i in range(60)]
    rows, report = curate.curate(prompts, CurateParams(eval_fraction=0.25), seed=1)
    assert report["categories"] == {"a": {"eval": 10, "train": 30}, "b": {"eval": 5, "train": 15}}
    rows2, _ = curate.curate(prompts, CurateParams(eval_fraction=0.25), seed=2)
    assert {r["id"] for r in rows if r["split"] == "eval"} != {r["id"] for r in rows2 if r["split"] == "eval"}
    json.dumps(report)  # the report is JSON-serialisable (dvc metrics)
