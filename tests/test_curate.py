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
        ("quote.csv", b'prompt,category\n"two red circles,a\nthree blue squares,b\n',
         "quote.csv:2: malformed CSV from this row on (unexpected end of data)"),
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


def test_invisible_and_control_characters_never_reach_a_prompt(tmp_path):
    (tmp_path / "hostile.txt").write_text(
        "\x1b[31ma red car\x1b[0m\n"           # ANSI colour escapes: dropped
        "a bell\x07 rings twice\n"             # other control characters: dropped
        "a \u202egreen\u202c tree\n"           # bidi override: removed, the prompt kept
        "two\u200b blue\u200d boats\n"         # zero-width characters: removed
        "\u200b\u200c\u200d\ufeff\n"            # nothing but zero-width: too short
        "a plain line\n", encoding="utf-8")
    report = curate.run(_project(tmp_path, ["hostile.txt"]))
    texts = sorted(pd.read_parquet(_outputs(tmp_path)[0])["text"])
    assert texts == ["a green tree", "a plain line", "two blue boats"]
    assert report["dropped"] == {"control_characters": 2, "too_short": 1}


def test_fuzzed_prompt_files_are_refused_in_one_line_or_curated_clean(tmp_path, capsys, monkeypatch):
    """Random bytes, cut quotes, stray JSON and control characters in .txt/.csv/.jsonl files:
    each run either curates prompts free of control and format characters, or exits 1
    with one line naming the file, leaving no output or temporary file behind."""
    import random
    import unicodedata

    rng = random.Random(28)
    pieces = ["a red car", '"', ",", "\n", "\r\n", "{", "}", '"prompt": ', "\x00", "\x1b[1m", "\u202e", "\u200b",
              "\ufeff", "é", "\\", "prompt,category", "'", "\t", "null", "[1]", "  "]
    outcomes = {"curated": 0, "refused": 0}
    for i in range(150):
        root = tmp_path / str(i)
        root.mkdir()
        name = f"p{i}" + rng.choice([".txt", ".csv", ".jsonl"])
        head = {"txt": "", "csv": "prompt,category\n", "jsonl": ""}[name.rsplit(".", 1)[1]]
        body = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 40)))
        data = (head + body).encode("utf-8")
        if rng.random() < 0.15:
            data += bytes([rng.randrange(128, 256)])  # not UTF-8
        (root / name).write_bytes(data)
        _project(root, [name])
        monkeypatch.chdir(root)
        code = curate.main()
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        outputs = _outputs(root)
        if code == 0:
            texts = pd.read_parquet(outputs[0])["text"]
            assert not any(unicodedata.category(ch) in ("Cc", "Cf") for t in texts for ch in t), list(texts)
            outcomes["curated"] += 1
        else:
            assert code == 1 and len(err) == 1 and name in err[0], (data, err)
            assert "Traceback" not in captured.err
            assert not any(p.exists() for p in outputs)
            outcomes["refused"] += 1
        assert not list(root.rglob("*.tmp"))
    assert min(outcomes.values()) > 10, outcomes  # both paths were exercised


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
