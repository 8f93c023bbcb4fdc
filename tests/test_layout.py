"""Architecture rules the codebase relies on."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "diffusers", "great_expectations", "transformers", "prefect", "dvc", "boto3")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_components_never_import_prefect_or_flows():
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "components").rglob("*.py")
                 if _imports(p) & {"prefect", "flows"}]
    assert not offenders


def test_cli_startup_imports_no_heavy_library():
    code = ("import sys, flows.cli; flows.cli.build_parser();"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"`aligndiff --help` would import: {out}"


def test_secrets_and_state_are_git_ignored():
    ignored = subprocess.run(["git", "check-ignore", ".env", ".aligndiff/x", ".dvc/config.local"],
                             cwd=REPO, capture_output=True, text=True).stdout.split()
    assert ignored == [".env", ".aligndiff/x", ".dvc/config.local"]
