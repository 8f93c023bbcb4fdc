"""`curate` stage: prompt sources → one deduplicated, split prompt table.

Sources are the world grammar (``world``) and user files: ``.txt`` (one prompt per
line), ``.csv`` / ``.jsonl`` (a ``prompt`` column, optional ``category``). Prompts
are normalised (Unicode NFKC, invisible format characters such as zero-width spaces
and bidi overrides removed, whitespace, lower case). Dropped: prompts holding control
characters (ANSI escapes, NUL, …), exact and near duplicates (near = same words after
removing punctuation, in any order), prompts outside the length bounds or containing
a blocklisted word. Ids are the
hash of the normalised text, so they are stable across runs and machines; the
train/eval split is stratified by category and seeded.

A bad file (missing, not UTF-8, no prompt column, malformed CSV quoting, empty, an
oversized line) is a one-line error naming the file and line, and nothing is written.

Run as a stage: ``python -m components.curate`` (reads params.yaml).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from components.config import CurateParams
from components.errors import UserError
from components.stage import run_stage
from components.world.grammar import all_compositions

PROMPTS_OUT = Path("data/prompts.parquet")
REPORT_OUT = Path("reports/curate.json")
COLUMNS = ["id", "text", "category", "tags", "source", "split"]


@dataclass
class Prompt:
    text: str
    category: str
    source: str
    tags: list[str] = field(default_factory=list)


def normalise(text: str) -> str:
    """NFKC, without format characters (category Cf: zero-width, bidi controls), one space
    between words, lower case."""
    text = "".join(ch for ch in unicodedata.normalize("NFKC", text) if unicodedata.category(ch) != "Cf")
    return " ".join(text.split()).lower()


def has_control_characters(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def prompt_id(normalised_text: str) -> str:
    return hashlib.sha256(normalised_text.encode("utf-8")).hexdigest()[:16]


def _near_key(text: str) -> str:
    return " ".join(sorted(re.sub(r"[^\w\s]", " ", text).split()))


# ---- sources -------------------------------------------------------------------

def world_prompts(holdout: list[str]) -> list[Prompt]:
    """The 96 grammar prompts; compositions held out of pre-training are tagged ``unseen``."""
    out = []
    for c in all_compositions():
        unseen = f"{c.count_word} {c.colour}" in holdout
        out.append(Prompt(
            text=c.prompt,
            category="world/unseen" if unseen else "world/seen",
            source="world",
            tags=[f"count:{c.count_word}", f"colour:{c.colour}", f"shape:{c.shape}", f"background:{c.background}"],
        ))
    return out


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); re-save the file as UTF-8") from None


def _check_line_lengths(path: Path, text: str, max_line_chars: int) -> None:
    for number, line in enumerate(text.splitlines(), start=1):
        if len(line) > max_line_chars:
            raise UserError(f"{path}:{number}: line is {len(line)} characters, more than "
                            f"curate.max_line_chars={max_line_chars}")


def file_prompts(path: Path, max_line_chars: int) -> list[Prompt]:
    if not path.is_file():
        raise UserError(f"{path}: prompt file not found (curate.sources)")
    text = _decode(path)
    _check_line_lengths(path, text, max_line_chars)
    suffix = path.suffix.lower()
    rows: list[tuple[int, str, str | None]] = []  # (line, prompt, category)
    if suffix == ".txt":
        rows = [(n, line, None) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    elif suffix == ".csv":
        # strict: an unterminated quote is an error, not a field that swallows the rest of the file
        reader = csv.DictReader(io.StringIO(text), strict=True)
        row_start = 1  # the line where the row being read begins
        try:
            if not reader.fieldnames or "prompt" not in reader.fieldnames:
                raise UserError(f"{path}:1: no 'prompt' column (found: {', '.join(reader.fieldnames or []) or 'none'})")
            row_start = reader.line_num + 1
            for row in reader:
                if row.get("prompt") is None:
                    raise UserError(f"{path}:{reader.line_num}: row has fewer fields than the header")
                if row["prompt"].strip():
                    rows.append((reader.line_num, row["prompt"], row.get("category") or None))
                row_start = reader.line_num + 1
        except csv.Error as exc:
            raise UserError(f"{path}:{row_start}: malformed CSV from this row on ({exc}); check its quotes") from None
    elif suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or "prompt" not in obj:
                raise UserError(f"{path}:{n}: expected an object with a 'prompt' field")
            if not isinstance(obj["prompt"], str):
                raise UserError(f"{path}:{n}: 'prompt' must be a string, got {type(obj['prompt']).__name__}")
            category = obj.get("category")
            if category is not None and not isinstance(category, str):
                raise UserError(f"{path}:{n}: 'category' must be a string, got {type(category).__name__}")
            if obj["prompt"].strip():
                rows.append((n, obj["prompt"], category))
    else:
        raise UserError(f"{path}: unsupported prompt file type {suffix or '(none)'}; expected .txt, .csv or .jsonl")
    if not rows:
        raise UserError(f"{path}: no prompts in file")
    return [Prompt(text=p, category=(c or "user").strip(), source=str(path)) for _, p, c in rows]


# ---- curation ------------------------------------------------------------------

def curate(prompts: list[Prompt], params: CurateParams, seed: int) -> tuple[list[dict], dict]:
    """Normalise, filter, deduplicate and split; returns (rows, report)."""
    dropped: Counter[str] = Counter()
    blocked = [re.compile(rf"\b{re.escape(normalise(w))}\b") for w in params.blocklist]
    seen_exact: set[str] = set()
    seen_near: set[str] = set()
    rows = []
    for prompt in prompts:
        text = normalise(prompt.text)
        if has_control_characters(text):
            dropped["control_characters"] += 1
            continue
        if len(text) < params.min_chars:
            dropped["too_short"] += 1
            continue
        if len(text) > params.max_chars:
            dropped["too_long"] += 1
            continue
        if any(b.search(text) for b in blocked):
            dropped["blocklisted"] += 1
            continue
        if text in seen_exact:
            dropped["duplicate"] += 1
            continue
        near = _near_key(text)
        if near in seen_near:
            dropped["near_duplicate"] += 1
            continue
        seen_exact.add(text)
        seen_near.add(near)
        rows.append({"id": prompt_id(text), "text": text, "category": prompt.category, "tags": prompt.tags,
                     "source": prompt.source})
    if not rows:
        sources = ", ".join(sorted({p.source for p in prompts})) or "no source"
        raise UserError(f"curate: every prompt of {sources} was filtered out "
                        f"(dropped: {dict(sorted(dropped.items()))}); check curate.sources and the filters")
    _split(rows, params.eval_fraction, seed)
    rows.sort(key=lambda r: r["id"])
    report = {
        "prompts": len(rows),
        "dropped": dict(sorted(dropped.items())),
        "splits": dict(sorted(Counter(r["split"] for r in rows).items())),
        "categories": {c: dict(sorted(Counter(r["split"] for r in rows if r["category"] == c).items()))
                       for c in sorted({r["category"] for r in rows})},
    }
    return rows, report


def _split(rows: list[dict], eval_fraction: float, seed: int) -> None:
    """Per category, a seeded hash order puts round(n·fraction) prompts in eval."""
    by_category: dict[str, list[dict]] = {}
    for row in rows:
        by_category.setdefault(row["category"], []).append(row)
    for members in by_category.values():
        members.sort(key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())
        n_eval = round(len(members) * eval_fraction)
        for i, row in enumerate(members):
            row["split"] = "eval" if i < n_eval else "train"


def write_outputs(rows: list[dict], report: dict, prompts_out: Path, report_out: Path) -> None:
    """Write both outputs to temporary files first, so a failure leaves nothing partial."""
    import pandas as pd

    prompts_out.parent.mkdir(parents=True, exist_ok=True)
    report_out.parent.mkdir(parents=True, exist_ok=True)
    tmp_prompts = prompts_out.with_name(prompts_out.name + ".tmp")
    tmp_report = report_out.with_name(report_out.name + ".tmp")
    try:
        pd.DataFrame(rows, columns=COLUMNS).to_parquet(tmp_prompts, index=False)
        tmp_report.write_text(json.dumps(report, indent=2) + "\n")
        tmp_prompts.replace(prompts_out)
        tmp_report.replace(report_out)
    finally:
        tmp_prompts.unlink(missing_ok=True)
        tmp_report.unlink(missing_ok=True)


def run(root: Path = Path(".")) -> dict:
    from components.project import Project

    return curate_project(Project.load(root))


def curate_project(project) -> dict:
    params = project.params
    prompts: list[Prompt] = []
    for source in params.curate.sources:
        if source == "world":
            prompts += world_prompts(params.world.holdout)
        else:
            prompts += file_prompts(project.path(source), params.curate.max_line_chars)
    rows, report = curate(prompts, params.curate, params.seed)
    write_outputs(rows, report, project.path(PROMPTS_OUT), project.path(REPORT_OUT))
    return report


def _stage(project) -> str:
    report = curate_project(project)
    return f"{report['prompts']} prompts ({report['splits']}); dropped {report['dropped'] or 'none'}"


def main() -> int:
    return run_stage("curate", _stage)


if __name__ == "__main__":
    sys.exit(main())
