"""`gate` stage: pass/fail of the candidate from ``reports/evaluation.json`` and ``gate:``.

One line per failed criterion (``win rate 0.41 < 0.5 (gate.min_win_rate)``). The
decision is data, not an error: the stage succeeds either way and writes
``reports/gate.json``; promotion reads it. Run as a stage: ``python -m components.gate``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from components.errors import UserError
from components.evaluate import METRICS_OUT
from components.project import Project

DECISION_OUT = Path("reports/gate.json")


def decide(metrics: dict, gate, profile: str) -> dict:
    failures, checked = [], []

    def need(ok: bool, name: str, line: str) -> None:
        checked.append(name)
        if not ok:
            failures.append(line)

    reward = metrics.get("reward")
    if reward is None:
        failures.append("no learned-reward metrics (models/reward missing): win rate and reward gain unknown")
    else:
        interval = reward.get("win_rate_interval")
        spread = f"; 95% interval over prompts {interval['low']:.2f}–{interval['high']:.2f}" if interval else ""
        need(reward["win_rate"] >= gate.min_win_rate, "win_rate",
             f"win rate {reward['win_rate']:.3f} < {gate.min_win_rate:g} (gate.min_win_rate){spread}")
        need(reward["gain"] >= gate.min_reward_gain, "reward_gain",
             f"reward gain {reward['gain']:+.4f} < {gate.min_reward_gain:g} (gate.min_reward_gain)")
    drop = metrics["diversity"]["drop"]
    need(drop <= gate.max_diversity_drop, "diversity_drop",
         f"diversity drop {drop:.3f} > {gate.max_diversity_drop:g} (gate.max_diversity_drop)")
    copies = metrics["memorization"]["near_copy_rate"]
    need(copies <= gate.max_memorization_rate, "memorization",
         f"near-copy rate {copies:.3f} > {gate.max_memorization_rate:g} (gate.max_memorization_rate)")
    if profile == "world":
        gain = metrics["judge"]["gain"]
        need(gain >= gate.min_judge_gain, "judge_gain",
             f"judge alignment gain {gain:+.3f} < {gate.min_judge_gain:g} (gate.min_judge_gain)")
    return {"passed": not failures, "failures": failures, "checked": checked,
            "candidate": metrics["candidate"], "production": metrics["production"]}


def gate(project: Project) -> dict:
    path = project.path(METRICS_OUT)
    if not path.exists():
        raise UserError(f"{METRICS_OUT}: not found; run `dvc repro evaluate`")
    decision = decide(json.loads(path.read_text()), project.params.gate, project.params.profile)
    out = project.path(DECISION_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(decision, indent=2) + "\n")
    return decision


def _stage(project: Project) -> str:
    decision = gate(project)
    if decision["passed"]:
        return f"PASS: candidate {decision['candidate']} may replace production {decision['production']}"
    return "FAIL: production stays\n" + "\n".join(f"  {line}" for line in decision["failures"])


def main() -> int:
    from components.stage import run_stage

    return run_stage("gate", _stage)


if __name__ == "__main__":
    sys.exit(main())
