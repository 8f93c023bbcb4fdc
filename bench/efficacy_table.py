"""The docs' efficacy table, from bench/results/efficacy.jsonl: one row per run on one base.

    python bench/efficacy_table.py [--base VERSION_PREFIX]

Without --base: the base of the file's last run. Columns: the method and what its run
changed from params.yaml, the simulated votes it used, its rounds, wall minutes on the
machine that ran it, and the points gained over the base (seen / held-out compositions)
in judge alignment and per attribute.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "efficacy.jsonl"
ATTRIBUTES = ("count", "colour", "shape", "background")
# overrides every run of the method carries (the bench's own defaults), not worth a column
IMPLIED = ("finetune.method=", "generate.images_per_prompt=8")


def votes_and_rounds(run: dict) -> tuple[str, str]:
    if run["method"] == "continued_pretraining":
        return "—", f"{run['steps']} steps"
    if "rounds" in run and isinstance(run["rounds"], list):
        return f"{sum(r['labels']['votes'] for r in run['rounds']):,}", str(len(run["rounds"]))
    labels = run.get("labels") or {}
    return (f"{labels['votes']:,}" if "votes" in labels else "—"), "1"


def row(run: dict) -> str:
    changed = [o for o in run.get("overrides", []) if not o.startswith(IMPLIED)]
    name = run["method"] + (f" ({', '.join(changed)})" if changed else "")
    votes, rounds = votes_and_rounds(run)
    gain, attrs = run["gain_points"], run["attribute_gain_points"]

    def pair(seen: float, unseen: float) -> str:
        return f"{seen:+.1f} / {unseen:+.1f}"

    cells = [name, votes, rounds, f"{run['wall_minutes']:.1f}", pair(gain["seen"], gain["unseen"]),
             *(pair(attrs["seen"][a], attrs["unseen"][a]) for a in ATTRIBUTES)]
    return "| " + " | ".join(cells) + " |"


def table(runs: list[dict]) -> str:
    header = ["run", "votes", "rounds", "wall min", "aligned", *ATTRIBUTES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + [row(r) for r in runs])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", help="the base version (a prefix is enough); default: the last run's")
    args = ap.parse_args()
    runs = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    base = args.base or runs[-1]["base_version"]
    mine = [r for r in runs if r.get("base_version", "").startswith(base)]  # the first runs predate versions
    if not mine:
        raise SystemExit(f"{RESULTS}: no run on a base version starting {base!r}")
    first = mine[0]["base"]
    print(f"base {mine[0]['base_version']}: aligned {first['seen']['aligned']:.1%} seen / "
          f"{first['unseen']['aligned']:.1%} held-out ({first['seen']['images']} / {first['unseen']['images']} images)\n")
    print(table(mine))


if __name__ == "__main__":
    main()
