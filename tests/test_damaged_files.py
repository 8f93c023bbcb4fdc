"""A damaged bookkeeping file is one line naming it and the fix, never a traceback."""

from __future__ import annotations

import pytest

from components.annotation.store import AnnotationStore
from components.errors import UserError
from flows.cli import main as cli
from tests.conftest import write_project


@pytest.mark.parametrize("path, args, message", [
    ("data/generations.parquet", ["annotate", "push"], "not a readable Parquet table"),
    ("models/registry.json", ["models", "list"], "not valid JSON"),
    ("models/production.json", ["models", "list"], "not valid JSON"),
])
def test_a_damaged_project_file_is_one_line_naming_it(tmp_path, capsys, path, args, message):
    root = write_project(tmp_path / "p")
    (root / "models").mkdir()
    (root / "models" / "registry.json").write_text('{"versions": []}')
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_bytes(b"PAR1 half a file\x00{")
    assert cli(["--project", str(root), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"aligndiff: error: {root / path}: {message}"), err


def test_a_gate_decision_without_its_fields_is_refused_by_name(tmp_path, capsys):
    root = write_project(tmp_path / "p")
    (root / "models" / "candidate").mkdir(parents=True)
    (root / "models" / "candidate" / "candidate.json").write_text('{"base": "base"}')
    (root / "reports").mkdir()
    (root / "reports" / "gate.json").write_text('{"passed": true}')
    assert cli(["--project", str(root), "promote", "--no-commit"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"aligndiff: error: {root / 'reports/gate.json'}: expected a JSON object with candidate, passed, "
                   "failures (missing 'candidate'); re-run `dvc repro gate`"]


@pytest.mark.parametrize("name", ["watermark.json", "tasks.json"])
def test_damaged_sync_bookkeeping_says_it_is_safe_to_delete(tmp_path, name):
    store = AnnotationStore(tmp_path)
    (tmp_path / name).write_text("{trunc")
    read = store.watermark if name == "watermark.json" else store.task_ids
    with pytest.raises(UserError, match=rf"{name}: not valid JSON .*delete it and sync again"):
        read()


def test_a_damaged_model_index_is_one_line_naming_it(tmp_path, capsys):
    root = write_project(tmp_path / "p")
    model = root / "my-model"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline",')
    (root / "prompts.txt").write_text("a red car\n")
    code = cli(["--project", str(root), "sample", "--model", "my-model", "--prompts", str(root / "prompts.txt"),
                "--out", str(root / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"aligndiff: error: {model / 'model_index.json'}: not valid JSON")
    assert not (root / "out").exists()
