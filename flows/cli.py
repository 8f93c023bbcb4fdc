"""`aligndiff` command line.

The CLI is wiring: it dispatches to components (stage logic), infra (the embedded
services) and flows (orchestration). Heavy libraries are imported inside the
commands that need them so that `aligndiff --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from components.errors import UserError, expected_failure


def _project(args):
    from components.project import Project

    return Project.load(args.project, args.params)


def _use_embedded_prefect(project) -> None:
    """Flows run in this process report to the project's Prefect server."""
    from components import credentials

    os.environ["PREFECT_API_URL"] = project.prefect_api_url
    # only this one credential: commands that talk to Prefect alone need no other
    auth = os.environ.get(credentials.PREFECT_AUTH) or credentials.read_env_file(project.env_file).get(
        credentials.PREFECT_AUTH)
    if auth:  # inherited by the workers and flow-run processes this one starts
        os.environ[credentials.PREFECT_AUTH] = auth
    if "PREFECT_HOME" not in os.environ:
        home = project.state_dir / "prefect"
        home.mkdir(mode=0o700, parents=True, exist_ok=True)  # Prefect makes the last level only, or warns
        os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def cmd_params(args) -> int:
    project = _project(args)
    print(json.dumps(project.params.model_dump(by_alias=True), indent=2))
    return 0


def cmd_deploy(args) -> int:
    project = _project(args)
    if args.prefect_yaml:
        from flows.deploy import write_prefect_yaml

        print(f"wrote {write_prefect_yaml(project)}; register it with: prefect deploy --all")
        return 0
    _use_embedded_prefect(project)
    from flows.deploy import deploy

    for name, deployment_id in deploy(project).items():
        cron = getattr(project.params.schedules, name)
        print(f"{name + ':':<18} {cron or 'on demand':<16} {deployment_id}")
    print(f"start a worker to run them: aligndiff worker   (pool {project.params.schedules.work_pool})")
    return 0


def cmd_worker(args) -> int:
    """A process worker for the deployments, in the foreground (Ctrl-C stops it)."""
    import subprocess

    project = _project(args)
    _use_embedded_prefect(project)
    return subprocess.call([sys.executable, "-m", "prefect", "worker", "start", "--pool",
                            project.params.schedules.work_pool, "--type", "process"], cwd=project.root)


def cmd_retrain(args) -> int:
    project = _project(args)
    _use_embedded_prefect(project)
    from flows.pipeline import retrain

    print(f"full log: {_log_to_file(project, 'retrain')}", file=sys.stderr, flush=True)
    result = retrain(root=str(project.root), force=args.force)
    if not result["ran"]:
        return 0
    gate = result["gate"]
    print(f"stages run: {', '.join(result['stages_run']) or 'none (all up to date)'}")
    print(f"gate: {'PASS' if gate['passed'] else 'FAIL'}" + "".join(f"\n  {f}" for f in gate["failures"]))
    print(f"promoted: {result['promoted']['tag']}" if result["promoted"] else "production unchanged")
    return 0


def cmd_promote(args) -> int:
    from components import registry

    card = registry.promote(_project(args), force=args.force, commit=not args.no_commit)
    print(f"promoted {card['tag']} ({card['method']}, model {card['model_version']}); "
          f"card: models/production/model_card.md")
    return 0


def cmd_models(args) -> int:
    from components import registry

    rows = registry.listing(_project(args))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no promoted model yet: production is the base model")
        return 0
    print(f"{'':2}{'version':8} {'tag':12} {'method':16} {'win rate':>8} {'judge':>6}  promoted")
    for r in rows:
        mark = "* " if r["production"] else "  "
        print(f"{mark}{r['version']:8} {r['tag']:12} {r['method'] or '':16} {_num(r['win_rate']):>8} "
              f"{_num(r['judge_aligned']):>6}  {r['promoted_at']}")
    return 0


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def cmd_validate(args) -> int:
    from components import validate

    return validate.report(_project(args), args.datasets or None, full=args.full)


def cmd_init(args) -> int:
    from components import credentials
    from components.dvc_remote import configure_remote

    project = _project(args)
    added = credentials.generate_missing(project.env_file)
    if added:
        print(f"generated {', '.join(added)} in {project.env_file} (mode 0600)")
    if (project.root / ".dvc").is_dir():
        configure_remote(project)
        print(f"DVC default remote: {project.dvc_remote_url} at {project.s3_endpoint or 'AWS S3'}")
    return 0


def cmd_connect(args) -> int:
    from components.dvc_remote import configure_remote
    from components.project import Project
    from components.team import connect

    services = connect(args.project.resolve(), args.compose_env, args.host, args.params)
    project = Project.load(args.project, args.params)
    print(f"{args.params}: services are external now (embedded: false)")
    print(f"  S3:           {services['s3']['endpoint_url']}  (buckets {services['s3']['bucket']}, "
          f"{services['s3']['dvc_bucket']})")
    print(f"  Prefect API:  {services['prefect']['api_url']}")
    print(f"  Label Studio: {services['label_studio']['url']}")
    print(f"credentials: {project.env_file} (mode 0600)")
    if (project.root / ".dvc").is_dir():
        configure_remote(project)
        print(f"DVC default remote: {project.dvc_remote_url} at {project.s3_endpoint}")
    return 0


def cmd_up(args) -> int:
    from infra.stack import Stack

    project = _project(args)
    t0 = time.monotonic()
    result = Stack(project).up()
    if args.json:
        print(json.dumps({"seconds": round(time.monotonic() - t0, 1), "services": result}, indent=2))
    else:
        started = [n for n, r in result.items() if r["started"]]
        print(f"services up in {time.monotonic() - t0:.1f} s"
              + (f" (started: {', '.join(started)})" if started else " (all were already running)"))
    return 0


def cmd_down(args) -> int:
    from infra.stack import Stack

    stopped = Stack(_project(args)).down()
    print("stopped: " + ", ".join(stopped) if stopped else "nothing was running")
    return 0


def cmd_status(args) -> int:
    from infra.stack import Stack

    status = Stack(_project(args)).status()
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        for name, s in status.items():
            where = f"pid {s['pid']}" if s["pid"] else ("external" if not s["embedded"] else "not running")
            print(f"{s['title']:<15} {'healthy' if s['healthy'] else 'DOWN':<8} {s['url']:<28} {where}")
    return 0 if all(s["healthy"] for s in status.values()) else 1


def cmd_sample(args) -> int:
    from components import sample_cli

    project = _project(args)
    rows = sample_cli.run(project, args.model, args.prompts, args.n, args.seed, args.out)
    print(f"wrote {len(rows)} images and manifest.csv to {args.out}")
    return 0


def _progress(label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())


def _check_annotate_args(args) -> None:
    """Values argparse's types cannot judge alone, refused before anything is touched."""
    from components.annotation.labeling import IMAGE_KEYS

    if args.kind == "best_of_k" and not 2 <= args.k <= len(IMAGE_KEYS):
        raise UserError(f"--k {args.k}: best_of_k shows 2 to {len(IMAGE_KEYS)} images per task")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: expected at least 1 task (leave it out to push every candidate)")


def cmd_annotate(args) -> int:
    from components.annotation import rounds
    from components.annotation.simulate import AnnotatorConfig

    _check_annotate_args(args)
    project = _project(args)
    if args.action == "push":
        with _progress("push tasks") as progress:
            task = progress.add_task("push", total=args.limit)
            result = rounds.push_round(project, args.kind, args.k, args.limit, args.seed, selection=args.select,
                                       on_progress=lambda n: progress.advance(task, n))
    elif args.action == "simulate":
        config = AnnotatorConfig(annotators=args.annotators, coverage=args.coverage, flip_rate=args.flip_rate,
                                 bias=args.bias, seed=args.seed)
        with _progress("simulate tasks") as progress:
            task = progress.add_task("simulate", total=None)
            result = rounds.simulate_round(project, args.kind, args.k, config,
                                           on_progress=lambda n: progress.advance(task, n))
    elif args.action == "sync":
        with _progress("sync every task" if args.full else "sync changed tasks") as progress:
            task = progress.add_task("sync", total=None)
            result = rounds.sync_round(project, args.kind, args.k, full=args.full,
                                       on_progress=lambda done, total: progress.update(task, completed=done, total=total))
        result["per_annotator"] = rounds.per_annotator(project)
        rejected = rounds.rejected_reasons(project)
        for row in rejected.tail(args.show_rejected).itertuples():
            print(f"rejected annotation {row.annotation_id} (task {row.task_id}): {row.reason}")
        if args.full and not result["verified"]["equal"]:
            print(json.dumps(result, indent=2, default=str))
            print("annotate sync --full: the store differs from Label Studio after a full read "
                  "({missing} missing, {extra} extra, {outdated} outdated, {duplicated} duplicated); annotators may "
                  "have edited during the check: run it again".format(**result["verified"]), file=sys.stderr)
            return 1
    else:
        result = rounds.snapshot_labels(project)
    print(json.dumps(result, indent=2, default=str))
    return 0


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}:{seconds:02d}"


def _log_to_file(project, name: str) -> Path:
    """Every Prefect flow and task log line of this process, also in <state>/logs/NAME-TIME.log."""
    import logging

    path = project.state_dir / "logs" / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))  # owner-only from the start
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.getLogger("prefect").addHandler(handler)
    return path


def cmd_demo(args) -> int:
    """The whole loop on embedded defaults: base model, a labelled round, retrain, promotion."""
    from infra.stack import Stack

    project = _project(args)
    first_run = not (project.path("models/base") / "model_index.json").exists()
    # measured on 2 cores (docs/performance.md)
    print("demo: about " + ("24 min: this first run pre-trains the world's VAE, CLIP and base model (16–18 min)"
                            if first_run
                            else "8 min: the base model is built; a round of labels and a retrain"), flush=True)
    phases: dict[str, float] = {}

    def timed(name: str, step, *args, **kwargs):
        started = time.monotonic()
        result = step(*args, **kwargs)
        phases[name] = time.monotonic() - started
        return result

    timed("services", Stack(project).up)
    _use_embedded_prefect(project)
    from components.annotation.snapshot import LABELS_DIR
    from components.stage_graph import runnable_stages
    from flows.loop import annotation_round, sync_annotations
    from flows.pipeline import reproduce, retrain

    log_path = _log_to_file(project, "demo")  # after Prefect configured its loggers, which drops handlers

    # The stages before the labels: the retrain below rebuilds the rest from a fresh snapshot
    # (the committed one may label images of an earlier base model).
    before_labels, _ = runnable_stages(project.root, unavailable=frozenset({str(LABELS_DIR)}))
    root = str(project.root)
    summary = timed("reproduce", reproduce, root=root, targets=before_labels)
    timed("annotation round", annotation_round, root=root, simulated=True)
    timed("sync", sync_annotations, root=root)
    result = timed("retrain", retrain, root=root)
    print()
    print("phases:           " + ", ".join(f"{name} {_clock(seconds)}" for name, seconds in phases.items()))
    print(f"full log:         {log_path}")
    print(f"Prefect UI:       {project.prefect_ui_url}")
    print(f"Label Studio:     {project.label_studio_url}")
    print(f"stages run:       {', '.join(summary['stages_run'] + result.get('stages_run', [])) or 'none (all up to date)'}")
    for name, values in summary["metrics"].items():
        if name != "candidate vs production":  # an earlier retrain's, before this run's labels; this run's is below
            print(f"{name + ':':<17} " + ", ".join(f"{k} {v}" for k, v in values.items()))
    if not result["ran"]:
        print(f"retrain:          skipped, {result['new_labels']} new labels (retrain.min_new_labels "
              f"{project.params.retrain.min_new_labels}); `aligndiff retrain --force` runs it anyway")
    evaluation = project.path("reports/evaluation.json")
    if result["ran"] and evaluation.exists():
        judge = json.loads(evaluation.read_text()).get("judge")
        if judge:
            print(f"judge alignment:  {judge['production']['all']['aligned']:.1%} (production before) -> "
                  f"{judge['candidate']['all']['aligned']:.1%} (candidate), eval prompts")
        gate = json.loads(project.path("reports/gate.json").read_text())
        print("gate:             " + ("PASS" if gate["passed"] else "FAIL: " + "; ".join(gate["failures"])))
        print(f"report:           {project.path('reports/evaluation.md')}")
    pointer = json.loads(project.path("models/production.json").read_text())
    print(f"production:       {pointer['version']} ({pointer['tag'] or 'the base model'})")
    return 0


FLOWS = {"reproduce": ("flows.pipeline", "reproduce"), "retrain": ("flows.pipeline", "retrain"),
         "generate": ("flows.pipeline", "generate"),
         "annotation_round": ("flows.loop", "annotation_round"), "sync_annotations": ("flows.loop", "sync_annotations"),
         "online_rounds": ("flows.loop", "online_rounds")}


def _flow_parameters(run_flow, flow: str, items: list[str]) -> dict:
    """``--param NAME=VALUE`` (VALUE read as YAML: 3, true, [pairwise]) checked against the flow's signature."""
    import inspect

    import yaml

    known = [n for n in inspect.signature(run_flow.fn).parameters if n != "root"]
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in known:
            raise UserError(f"--param {item}: expected NAME=VALUE with NAME one of {', '.join(known)} ({flow})")
        out[name] = yaml.safe_load(value)
    import logging

    from prefect.exceptions import ParameterTypeError

    prefect_log = logging.getLogger("prefect.flows")  # it logs the whole pydantic error before raising
    level = prefect_log.level
    prefect_log.setLevel(logging.CRITICAL)
    try:
        run_flow.validate_parameters({"root": ".", **out})
    except ParameterTypeError as exc:  # pydantic's several lines, in one
        raise UserError(f"--param: {' '.join(str(exc).split())}") from None
    finally:
        prefect_log.setLevel(level)
    return out


def cmd_run(args) -> int:
    """Run one flow now, reporting to the project's Prefect server."""
    import importlib

    project = _project(args)
    _use_embedded_prefect(project)
    module, name = FLOWS[args.flow]
    run_flow = getattr(importlib.import_module(module), name)
    parameters = _flow_parameters(run_flow, args.flow, args.param)
    print(f"full log: {_log_to_file(project, args.flow)}", file=sys.stderr, flush=True)
    result = run_flow(root=str(project.root), **parameters)
    print(json.dumps(result, indent=2, default=str))
    return 0


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="aligndiff",
        description="Align text-to-image diffusion models to human feedback.",
    )
    parser.add_argument("--project", default=".", type=Path, help="project root (default: current directory)")
    parser.add_argument("--params", default="params.yaml", help="params file, relative to the root")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="start the embedded services (S3, Prefect, Label Studio)")
    p.add_argument("--json", action="store_true", help="print start-up timings as JSON")
    p.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the embedded services (data stays)").set_defaults(func=cmd_down)
    p = sub.add_parser("status", help="URL, PID and health of each service (exit 1 if any is down)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("connect", help="point this project at the team stack of infra/compose.yaml "
                                       "(params.yaml services, .env credentials, DVC remote)")
    p.add_argument("--compose-env", required=True, type=Path, help="the stack's env file, e.g. infra/.env")
    p.add_argument("--host", default=None, help="host the stack's ports are reached on (default: its BIND_ADDRESS)")
    p.set_defaults(func=cmd_connect)
    sub.add_parser("init", help="generate credentials and configure the DVC remote").set_defaults(func=cmd_init)
    sub.add_parser("params", help="validate params.yaml and print the resolved values").set_defaults(func=cmd_params)
    p = sub.add_parser("sample", help="sample images from a model for a prompts file")
    p.add_argument("--model", default="production",
                   help="base, production, a registry tag (policy@vN) or a model directory (default: production)")
    p.add_argument("--prompts", required=True, type=Path, help="text file, one prompt per line")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("annotate", help="annotation rounds in Label Studio: push, simulate, sync, snapshot")
    p.add_argument("action", choices=["push", "simulate", "sync", "snapshot"])
    p.add_argument("--kind", choices=["binary", "pairwise", "best_of_k"], default="pairwise")
    p.add_argument("--k", type=int, default=2, help="images per task for best_of_k (2-4)")
    p.add_argument("--limit", type=int, default=None, help="push: at most this many tasks")
    p.add_argument("--select", choices=["auto", "random", "disagreement"], default="auto",
                   help="push, with --limit: where the reward ensemble disagrees most (auto: when models/reward "
                        "exists), or seeded random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--annotators", type=int, default=3, help="simulate: simulated annotators")
    p.add_argument("--coverage", type=int, default=3, help="simulate: annotators per task")
    p.add_argument("--flip-rate", type=float, default=0.1, help="simulate: probability of the wrong answer")
    p.add_argument("--bias", type=float, default=0.0, help="simulate: probability of answering good/left blindly")
    p.add_argument("--show-rejected", type=int, default=20, help="sync: rejected results to list")
    p.add_argument("--full", action="store_true",
                   help="sync: read every task, not only changed ones, then check that the store equals Label Studio")
    p.set_defaults(func=cmd_annotate)
    p = sub.add_parser("validate", help="check datasets with Great Expectations (one line per failure)")
    p.add_argument("datasets", nargs="*", metavar="DATASET", help="prompts, generations, labels (default: all)")
    p.add_argument("--full", action="store_true", help="fetch and decode every generation's objects, not a sample")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("deploy", help="register the scheduled deployments (schedules: in params.yaml)")
    p.add_argument("--prefect-yaml", action="store_true",
                   help="only render prefect.yaml from params.yaml, for `prefect deploy --all`")
    p.set_defaults(func=cmd_deploy)
    sub.add_parser("worker", help="run a worker for the deployments (foreground)").set_defaults(func=cmd_worker)
    p = sub.add_parser("run", help="run one flow now: " + ", ".join(FLOWS))
    p.add_argument("flow", choices=list(FLOWS))
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a flow parameter, e.g. `run online_rounds --param rounds=3 --param simulated=true`")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("retrain", help="run the retrain flow: snapshot, validate, train, evaluate, gate, promote")
    p.add_argument("--force", action="store_true", help="run even without retrain.min_new_labels new labels")
    p.set_defaults(func=cmd_retrain)
    p = sub.add_parser("promote", help="make the gated candidate production (model card, registry, git tag)")
    p.add_argument("--force", action="store_true", help="promote although the gate failed (recorded in the card)")
    p.add_argument("--no-commit", action="store_true", help="do not commit and tag the promotion in git")
    p.set_defaults(func=cmd_promote)
    p = sub.add_parser("models", help="model registry: `models list` shows versions and which is production")
    p.add_argument("action", choices=["list"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
    sub.add_parser("demo", help="the whole loop on embedded defaults: services, base model, a labelled round, "
                                "retrain, promotion").set_defaults(
        func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        for line in str(exc).splitlines():
            print(f"aligndiff: error: {line}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # the expected failures of the outside world, one line each
        line = expected_failure(exc)
        if line is None:
            raise
        print(f"aligndiff: error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aligndiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
