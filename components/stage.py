"""Entry point shared by every DVC stage command (`python -m components.<stage>`)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from components.errors import UserError
from components.project import Project


def run_stage(name: str, body: Callable[[Project], str]) -> int:
    """Run ``body`` on the project in the working directory.

    A :class:`UserError` becomes ``<stage>: error: <message>`` on stderr (one line per
    problem) and the error's exit code; otherwise the body's summary is printed.
    """
    try:
        summary = body(Project.load("."))
    except UserError as exc:
        for line in str(exc).splitlines():
            print(f"{name}: error: {line}", file=sys.stderr)
        return exc.exit_code
    print(f"{name}: {summary}")
    return 0
