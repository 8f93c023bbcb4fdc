"""Random bad command lines: each exits non-zero with one line and leaves the project as it was.

No services run: Label Studio's port is free, so commands that get past their
arguments meet a real connection refusal, which must be one line too.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from components import credentials
from flows.cli import main
from tests.conftest import write_project

BAD = {
    "annotate": [["--kind", "best_of_k", "--k", "1"], ["--kind", "best_of_k", "--k", "9"], ["--k", "x"],
                 ["--limit", "0"], ["--limit", "-1"], ["--limit", "many"], ["--flip-rate", "2"],
                 ["--flip-rate", "nan"], ["--bias", "-0.5"], ["--annotators", "2", "--coverage", "5"],
                 ["--annotators", "0"], ["--kind", "triple"], ["--seed", "x"], ["--colour", "red"]],
    "sample": [["--n", "0"], ["--n", "-2"], ["--n", "x"], ["--out", "{file}"], ["--prompts", "{folder}"],
               ["--prompts", "missing.txt"], ["--model", "no-such-model"], ["--seed", "1.5"]],
    "validate": [["nonsense"], ["--fullest"], ["prompts", "everything"]],
    "run": [["nonsense"], [], ["online_rounds", "--param", "rounds=abc"], ["online_rounds", "--param", "nope=1"],
            ["retrain", "--param", "force"]],
    "models": [["delete"], ["list", "--yaml"]],
    "params": [["--flat"]],
}
ACTIONS = {"annotate": ["push", "simulate", "sync", "snapshot", "bogus"], "sample": [""], "validate": [""],
           "run": [""], "models": [""], "params": [""]}


@pytest.fixture(autouse=True)
def _own_environment():
    """`aligndiff run` points this process's Prefect client at the project's server through
    os.environ; the environment is put back after each test."""
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_bad_command_lines_exit_non_zero_in_one_line_and_change_nothing(tmp_path, capsys):
    root = write_project(tmp_path / "project")
    credentials.generate_missing(root / ".env")
    (root / "prompts.txt").write_text("two red circles on a white background\n")
    (root / "a-file").write_text("not a folder\n")
    (root / "a-folder").mkdir()
    before = _tree(root)
    rng = random.Random(28)
    for _ in range(120):
        command = rng.choice(sorted(BAD))
        action = rng.choice(ACTIONS[command])
        args = [command, *([action] if action else [])]
        if command == "sample":
            args += ["--prompts", "prompts.txt", "--out", str(root / "samples")]
        for bad in rng.sample(BAD[command], k=min(len(BAD[command]), rng.randint(1, 2))):
            args += [a.format(file=root / "a-file", folder=root / "a-folder") for a in bad]
        argv = ["--project", str(root), *args]
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own exit
            code = exit_.code
        captured = capsys.readouterr()
        err = [line for line in captured.err.splitlines() if line.strip()]
        assert code not in (0, None), f"{argv}: accepted"
        assert len(err) == 1 and ": error: " in err[0], (argv, err)
        assert "Traceback" not in captured.err
        assert _tree(root) == before, argv


def test_a_bad_flow_parameter_is_one_line_naming_it(tmp_path, capsys):
    root = write_project(tmp_path / "project")
    credentials.generate_missing(root / ".env")
    assert main(["--project", str(root), "run", "online_rounds", "--param", "rounds=abc"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "aligndiff: error: --param: Flow run received invalid parameters: - rounds: Input should be a valid integer, "
        "unable to parse string as an integer"]
    assert main(["--project", str(root), "run", "online_rounds", "--param", "round=2"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "aligndiff: error: --param round=2: expected NAME=VALUE with NAME one of rounds, kinds, limit, simulated, "
        "flip_rate, poll_minutes, max_wait_hours (online_rounds)"]
