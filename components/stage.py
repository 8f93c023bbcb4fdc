"""Entry point shared by every DVC stage command (`python -m components.<stage>`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from components.errors import UserError, expected_failure
from components.project import Project

# Set by whoever runs the stages (the flows' `dvc repro` task): a file that collects
# the stages' error lines, since DVC reports only the command's exit code.
ERRORS_ENV = "ALIGNDIFF_STAGE_ERRORS"


def report_errors(lines: list[str]) -> None:
    """The lines on stderr, and into the $ALIGNDIFF_STAGE_ERRORS file if set."""
    print("\n".join(lines), file=sys.stderr)
    if os.environ.get(ERRORS_ENV):
        with open(os.environ[ERRORS_ENV], "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")


def quiet_library_noise() -> None:
    """Drop messages that say nothing about the run: from every Lightning run, an advert
    for a cloud logger, its accelerator inventory, its note on modules in eval mode, that
    it stopped at max_steps, and a torch deprecation inside Lightning's own code; from
    loading a Stable Diffusion pipeline, transformers' note that image processors we never
    run (the pipeline's safety-checker inputs) would be faster with torchvision, and
    diffusers' request to update a scheduler setting our timestep spacing never reads;
    and the bars of loading a model."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    # assembling a pipeline from our parts: the scheduler's steps_offset is 0, which only
    # "leading" timestep spacing reads (ours is "trailing")
    warnings.filterwarnings("ignore", message=r"The configuration file of this scheduler", category=FutureWarning)
    # frozen encoders and reference models are in eval mode on purpose
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not record.getMessage().startswith(("💡 Tip", "GPU available: ", "TPU available: ",
                                                             "HPU available: ", "`Trainer.fit` stopped: ")))
    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda record: "requires torchvision (not installed)" not in record.getMessage())
    if {"diffusers", "transformers"} & set(sys.modules):  # a stage that loads models: no bar for each load
        from components.models import quiet_model_io

        quiet_model_io()


def run_stage(name: str, body: Callable[[Project], str]) -> int:
    """Run ``body`` on the project in the working directory.

    A :class:`UserError` becomes ``<stage>: error: <message>`` on stderr (one line per
    problem) and the error's exit code, and so does an expected failure of the outside
    world (a service unreachable, a file that cannot be opened; exit code 1); otherwise
    the body's summary, if any, is printed.
    """
    quiet_library_noise()
    try:
        summary = body(Project.load("."))
    except UserError as exc:
        report_errors([f"{name}: error: {line}" for line in str(exc).splitlines()])
        return exc.exit_code
    except Exception as exc:
        line = expected_failure(exc)
        if line is None:
            raise
        report_errors([f"{name}: error: {line}"])
        return 1
    if summary:  # a data-parallel worker process has nothing to add to the first one's summary
        print(f"{name}: {summary}")
    return 0
