"""Multi-process fine-tuning: the finetune stage under Lightning DDP (gloo, 2 CPU processes)
trains the model one process trains at the same global batch, each process on its own
share of the data, one process writing the candidate; a killed run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from components import live
from components.finetune import stage as finetune_stage
from components.reward import train as reward_train
from tests.conftest import last_checkpoint_step
from tests.test_training_stages import _project

DDP_METHODS = ["d3po", "prdp", "reward_weighted"]
# Two half-batch means are not one mean to the last bit, and Adam turns a near-zero gradient
# of either sign into a step of ±lr: a few weights end up one step apart. So the models are
# compared by their whole update: LoRA's up-projections start at zero, so they are the update.
UPDATE_TOLERANCE = 0.02  # ‖B₂ − B₁‖ / ‖B₁‖; training on other data gives ≈ 1
TWO_PROCESSES: dict[str, dict[str, torch.Tensor]] = {}  # candidates of uninterrupted 2-process runs
@pytest.fixture(scope="module")
def project(stack_project, tmp_path_factory):
    project = _project(stack_project, tmp_path_factory.mktemp("ddp") / "project",
                       **{"finetune.threads": 1, "finetune.accelerator": "cpu", "finetune.checkpoint_every": 2,
                          "finetune.d3po.pairs_per_batch": 12, "finetune.d3po.lr": 1e-4,
                          "finetune.prdp.prompts_per_epoch": 3, "finetune.prdp.epochs": 2,
                          "finetune.prdp.lr": 1e-2, "finetune.reward_weighted.epochs": 1})
    reward_train.train_reward(project.params, project.root, project.object_store())
    return project


def run_finetune(project, method: str, processes: int, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    params = yaml.safe_load(project.path("params.yaml").read_text())
    params["finetune"].update(method=method, devices=processes, strategy="ddp" if processes > 1 else "auto")
    project.path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cmd = [sys.executable, "-m", "components.finetune.stage"]
    if popen:
        return subprocess.Popen(cmd, cwd=project.root, **popen)
    result = subprocess.run(cmd, cwd=project.root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def candidate(project) -> dict[str, torch.Tensor]:
    return load_file(project.path(finetune_stage.CANDIDATE_OUT) / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("method", DDP_METHODS)
def test_two_processes_train_what_one_does_each_on_its_own_share(project, method):
    run_finetune(project, method, 1)
    alone, alone_report = candidate(project), json.loads(project.path(finetune_stage.REPORT_OUT).read_text())
    alone_norms = live.curve(project.root, "finetune", "grad_norm")["grad_norm"]
    result = run_finetune(project, method, 2)
    together, report = candidate(project), json.loads(project.path(finetune_stage.REPORT_OUT).read_text())
    TWO_PROCESSES[method] = together

    assert result.stdout.count("finetune: ") == 1  # one summary: the first process's
    split = report["processes"]
    assert split["count"] == 2 and min(split["examples"]) > 0
    assert split["examples_in_two_processes"] == 0  # each process saw different data …
    assert sum(split["examples"]) == alone_report["processes"]["examples"][0]  # … and together all of it
    assert report["steps"] == alone_report["steps"]
    # the gradients were averaged, not summed (Adam would not tell: it is scale-free): the
    # first step's gradient norm, after the processes' all-reduce, is the one process's
    norms = live.curve(project.root, "finetune", "grad_norm")["grad_norm"]
    assert norms.iloc[0] == pytest.approx(alone_norms.iloc[0], rel=1e-4)
    # and the model is the one process's: the same update
    assert together.keys() == alone.keys()
    up = [k for k in alone if "lora_B" in k or "lora.up" in k]
    difference = torch.cat([(together[k] - alone[k]).flatten() for k in up]).norm()
    update = torch.cat([alone[k].flatten() for k in up]).norm()
    assert update > 0 and difference / update < UPDATE_TOLERANCE, f"{difference / update:.2e}"
    print(f"{method}: relative difference of the update, 2 processes vs 1: {difference / update:.1e}; "
          f"first grad norms {alone_norms.iloc[0]:.4g} / {norms.iloc[0]:.4g}")


def test_a_killed_two_process_run_resumes_to_the_same_model(project):
    if "d3po" not in TWO_PROCESSES:
        run_finetune(project, "d3po", 2)
        TWO_PROCESSES["d3po"] = candidate(project)
    expected = TWO_PROCESSES["d3po"]
    proc = run_finetune(project, "d3po", 2, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        start_new_session=True)
    checkpoints = project.state_dir / "checkpoints" / "finetune"

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and last_checkpoint_step(checkpoints) < 2:
        assert proc.poll() is None, "finetune finished before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # both processes, as a lost machine would
    proc.wait()
    rerun = run_finetune(project, "d3po", 2)
    assert "Restoring states from the checkpoint" in rerun.stdout + rerun.stderr
    resumed = candidate(project)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
