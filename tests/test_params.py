"""params.yaml validation: every mistake is one line naming the key path, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.config import load_params
from flows.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.profile == "world"
    assert params.services.s3.embedded


def _params_with(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(data)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    return tmp_path


BAD_CASES = {
    "unknown key": (lambda d: d["services"]["s3"].update(colour="red"), "services.s3.colour: unknown key"),
    "unknown top-level key": (lambda d: d.update(trainer={}), "trainer: unknown key"),
    "wrong type": (lambda d: d["services"]["prefect"].update(port="fast"), "services.prefect.port: expected a valid integer"),
    "out of range": (lambda d: d["services"]["s3"].update(port=70000), "services.s3.port: expected less than or equal to 65535"),
    "bad profile": (lambda d: d.update(profile="sd3"), "profile: expected 'world', 'sd15' or 'sdxl'"),
    "negative seed": (lambda d: d.update(seed=-1), "seed: expected greater than or equal to 0"),
    "same ports": (lambda d: d["services"]["prefect"].update(port=d["services"]["s3"]["port"]), "services: service ports must differ"),
    "gpu profile without weights": (lambda d: d.update(profile="sd15"), "needs models.sd15.path"),
    "unpinned revision": (lambda d: d["models"]["sdxl"].update(revision="main"), "models.sdxl: revision must be a 40-character commit hash"),
    "external prefect without url": (lambda d: d["services"]["prefect"].update(embedded=False), "prefect.api_url is required"),
    "bad bucket name": (lambda d: d["services"]["s3"].update(bucket="Has Spaces"), "services.s3.bucket: expected"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_invalid_params_give_one_line_naming_the_key_and_exit_2(case, tmp_path, capsys):
    edit, expected = BAD_CASES[case]
    root = _params_with(tmp_path, edit)
    assert main(["--project", str(root), "params"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("aligndiff: error: ") and "params.yaml: " in err[0]
    assert expected in err[0]


def test_pinned_gpu_profile_is_accepted(tmp_path, capsys):
    def edit(d):
        d["profile"] = "sd15"
        d["models"]["sd15"]["revision"] = "a" * 40

    assert main(["--project", str(_params_with(tmp_path, edit)), "params"]) == 0
    assert '"profile": "sd15"' in capsys.readouterr().out


def test_local_model_directory_is_accepted_without_revision(tmp_path):
    def edit(d):
        d["profile"] = "sdxl"
        d["models"]["sdxl"].update(path="/models/sdxl", repo_id=None)

    assert load_params(_params_with(tmp_path, edit) / "params.yaml").models.sdxl.path == "/models/sdxl"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("services:\n  s3: [unclosed\n", "params.yaml:3: invalid YAML"),
        ("- just\n- a list\n", "expected a mapping at the top level, got list"),
    ],
)
def test_unparseable_params(text, expected, tmp_path, capsys):
    (tmp_path / "params.yaml").write_text(text)
    assert main(["--project", str(tmp_path), "params"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_missing_params_file(tmp_path, capsys):
    assert main(["--project", str(tmp_path), "params"]) == 2
    assert "params.yaml: not found" in capsys.readouterr().err
