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
    "gpu profile without a clip": (lambda d: (d.update(profile="sd15"), d["models"]["sd15"].update(path="w")),
                                   "needs models.clip.path (a local CLIP directory, for the reward)"),
    "unpinned revision": (lambda d: d["models"]["sdxl"].update(revision="main"), "models.sdxl: revision must be a 40-character commit hash"),
    "external prefect without url": (lambda d: d["services"]["prefect"].update(embedded=False), "prefect.api_url is required"),
    "bad bucket name": (lambda d: d["services"]["s3"].update(bucket="Has Spaces"), "services.s3.bucket: expected"),
    "typo in an inactive profile": (lambda d: d["profiles"]["sdxl"]["finetune"]["lora"].update(rnak=4),
                                    "profiles.sdxl.finetune.lora.rnak: unknown key"),
    "bad value in a profile": (lambda d: d["profiles"]["sd15"]["finetune"].update(num_nodes=0),
                               "profiles.sd15.finetune.num_nodes: expected greater than or equal to 1"),
    "unknown profile overlay": (lambda d: d["profiles"].update(sd3={}), "profiles.sd3: unknown profile"),
    "profile overriding services": (lambda d: d["profiles"]["sd15"].update(services={"host": "0.0.0.0"}),
                                    "profiles.sd15.services: cannot be overridden by a profile"),
    "top-level typo next to profiles": (lambda d: d.update(turbo=True), "params.yaml: turbo: unknown key"),
    "boolean for a number": (lambda d: d["reward"].update(steps=True), "reward.steps: expected a valid integer"),
    "number for a boolean": (lambda d: d["retrain"].update(promote=1), "retrain.promote: expected a valid boolean"),
    "NaN threshold": (lambda d: d["gate"].update(min_reward_gain=float("nan")), "gate.min_reward_gain: expected a finite"),
    "min above max": (lambda d: d["validate"].update(min_good_share=0.9, max_good_share=0.5),
                      "validate: min_good_share 0.9 is above max_good_share 0.5"),
    "min chars above max": (lambda d: d["curate"].update(min_chars=50, max_chars=10), "min_chars 50 is above max_chars"),
    "no guidance": (lambda d: d["sample"].update(guidance_scale=0), "sample.guidance_scale: expected greater than or equal to 1"),
    "Lightning precision typo": (lambda d: d["finetune"].update(precision="bf16"), "finetune.precision: expected '32-true'"),
    "devices neither a count nor auto": (lambda d: d["finetune"].update(devices="two"),
                                         "finetune.devices: expected a valid integer or 'auto', got 'two'"),
    "bad cron": (lambda d: d["schedules"].update(retrain="every night"), "retrain: 'every night' is not a cron expression"),
    "state dir outside the project": (lambda d: d["services"].update(state_dir="/"), "state_dir must be a relative path"),
    "dvc prefix climbing out": (lambda d: d["services"]["s3"].update(dvc_prefix="../.."), "dvc_prefix must be a relative path"),
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
        d["models"]["clip"]["revision"] = "b" * 40

    assert main(["--project", str(_params_with(tmp_path, edit)), "params"]) == 0
    assert '"profile": "sd15"' in capsys.readouterr().out


def test_gpu_profile_applies_its_overrides_and_keeps_the_rest(tmp_path):
    def edit(d):
        d["profile"] = "sd15"
        d["models"]["sd15"].update(path="/models/sd15", repo_id=None)
        d["models"]["clip"].update(path="/models/clip", repo_id=None)

    world = load_params(REPO / "params.yaml")
    sd15 = load_params(_params_with(tmp_path, edit) / "params.yaml")
    assert (sd15.finetune.precision, sd15.finetune.gradient_checkpointing, sd15.finetune.lora.rank) == (
        "bf16-mixed", True, 16)
    assert sd15.sample.guidance_scale == 5.0 and sd15.finetune.d3po.timestep_fraction == 1.0
    # keys a profile does not name keep the file's values
    assert sd15.finetune.d3po.beta == world.finetune.d3po.beta
    assert sd15.finetune.lora.target_modules == world.finetune.lora.target_modules
    assert sd15.gate == world.gate and sd15.services == world.services
    assert world.finetune.precision == "32-true"  # the world profile ignores the overlays


def test_dvc_stages_that_read_profile_sections_depend_on_the_overlays():
    """Editing profiles.sd15.finetune must make `dvc repro` rerun finetune under profile sd15."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    overlaid = {key for overlay in data["profiles"].values() for key in overlay}
    for name, stage in stages.items():
        keys = {str(p).split(".")[0] for p in stage.get("params", [])}
        if "profile" in keys and keys & overlaid:
            assert "profiles" in keys, name


def test_local_model_directory_is_accepted_without_revision(tmp_path):
    def edit(d):
        d["profile"] = "sdxl"
        d["models"]["sdxl"].update(path="/models/sdxl", repo_id=None)
        d["models"]["clip"].update(path="/models/clip", repo_id=None)

    models = load_params(_params_with(tmp_path, edit) / "params.yaml").models
    assert (models.sdxl.path, models.clip.path) == ("/models/sdxl", "/models/clip")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("services:\n  s3: [unclosed\n", "params.yaml:3: invalid YAML"),
        ("- just\n- a list\n", "expected a mapping at the top level, got list"),
        ("", "params.yaml: empty; expected the sections of params.yaml"),
        ("# only a comment\n", "params.yaml: empty"),
        ("seed: 1\nservices: {}\nseed: 2\n", "params.yaml:3: invalid YAML: duplicate key 'seed'"),
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


def _leaves(node, path=()):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, (*path, i))
    else:
        yield path, node


def _wrong_for(value, rng):
    """A value of another type than ``value`` (so the schema must refuse it)."""
    if isinstance(value, bool):
        return rng.choice([1, "yes", 0.5, [True]])
    if isinstance(value, int):
        return rng.choice(["7", True, [value], {"n": value}, float("nan")])
    if isinstance(value, float):
        return rng.choice(["0.5", True, float("nan"), float("inf"), [value]])
    if isinstance(value, str):
        return rng.choice([12, True, [value], {"v": value}])
    if value is None:
        return rng.choice([[1], {"a": 1}])
    return rng.choice([17, "text", [1, 2]])  # a section given as a scalar


def test_fuzzed_params_files_are_each_refused_in_one_line(tmp_path, capsys):
    """Hundreds of params.yaml files, each with one wrong value (another type, NaN, a
    section as a scalar) or one unknown key anywhere: exit 2 with one line naming the
    file, never a traceback, and no file left next to it."""
    import random

    rng = random.Random(28)
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    leaves = [(path, value) for path, value in _leaves(base) if path]
    for i in range(300):
        data = yaml.safe_load((REPO / "params.yaml").read_text())
        path, value = leaves[rng.randrange(len(leaves))]
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(value, dict) and rng.random() < 0.5:
            parent[path[-1]]["no_such_knob"] = 1
        else:
            parent[path[-1]] = _wrong_for(value, rng)
        root = tmp_path / str(i)
        root.mkdir()
        (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        code = main(["--project", str(root), "params"])
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        where = f"{'.'.join(map(str, path))} ← {parent[path[-1]]!r}"
        assert code == 2, f"{where}: accepted"
        assert len(err) == 1 and err[0].startswith("aligndiff: error: ") and "params.yaml" in err[0], (where, err)
        assert "Traceback" not in captured.err and not captured.out
        assert sorted(p.name for p in root.iterdir()) == ["params.yaml"]


def test_editing_params_keeps_the_file_and_leaves_other_yaml_writers_alone(tmp_path):
    """A round's sample growth edits params.yaml in the flow's process, where DVC then writes
    dvc.lock with ruamel too: that lock must come out as `dvc repro` alone writes it."""
    from ruamel.yaml import YAML

    from components.config import update_params

    path = tmp_path / "params.yaml"
    original = (Path(__file__).resolve().parents[1] / "params.yaml").read_text()
    path.write_text(original)
    assert update_params(path, {"generate": {"images_per_prompt": 8}}).generate.images_per_prompt == 8
    before, after = original.splitlines(), path.read_text().splitlines()
    assert [(a, b) for a, b in zip(before, after) if a != b] == [("  images_per_prompt: 4", "  images_per_prompt: 8")]
    assert len(before) == len(after)  # comments, nulls and quoting as written

    import io

    out = io.StringIO()
    YAML().dump({"branch_step": None}, out)
    assert out.getvalue() == "branch_step:\n"  # ruamel's own default, as in a lock written by `dvc repro`
