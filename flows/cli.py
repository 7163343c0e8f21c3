"""`merge-eval` command line: validate, run, serve (and the inspection commands the stages add).

User mistakes (bad config, missing model, incompatible parents) print one line per problem and exit 2; only
genuine bugs show a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flows.config import ConfigError, load_config

USAGE_ERROR = 2


def _offline_defaults() -> None:
    """Quiet, local-first defaults; anything the user set explicitly wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Prefect's default 20 s for its temporary in-process server is too short on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _user_errors() -> tuple[type[Exception], ...]:
    from merging.checkpoints import CheckpointError
    from merging.family import FamilyError
    from merging.merge import MergeError
    from merging.preflight import PreflightError
    from probing.capture import CaptureError
    from probing.holmes import HolmesError
    from probing.inspect import ProbesError
    from reports.report import ReportError

    return (ConfigError, CheckpointError, FamilyError, MergeError, PreflightError, HolmesError, CaptureError,
            ProbesError, ReportError)


def cmd_validate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{args.config}: ok ({len(config.models)} models, {len(config.merge_names)} merges)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    load_config(args.config)  # fail fast, before Prefect starts its server
    from flows.pipeline import merge_eval

    run_dir = merge_eval(config_path=str(args.config), run_dir=str(args.run_dir) if args.run_dir else None)
    print(f"results in {run_dir}")
    report = Path(run_dir) / "report" / "index.html"
    if report.is_file():
        print(f"report: {report}")
    return 0


def cmd_probes(args: argparse.Namespace) -> int:
    from probing.inspect import show_probes

    show_probes(args.run_dir, task=args.task, model=args.model)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from reports.report import write_report

    print(write_report(args.run_dir))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.deployments import serve_deployments

    serve_deployments()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="merge-eval", description="Evaluate LLM merges by behaviour and internals.")
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="check a config; exit 2 with one line per problem")
    validate.add_argument("config", type=Path)
    validate.set_defaults(handler=cmd_validate)
    run = commands.add_parser("run", help="run the whole pipeline (a Prefect flow, in-process)")
    run.add_argument("config", type=Path)
    run.add_argument("--run-dir", type=Path, default=None, help="default: runs/<config name>/")
    run.set_defaults(handler=cmd_run)
    probes = commands.add_parser("probes", help="per-layer probe curves; no --task/--model: list tasks and models")
    probes.add_argument("run_dir", type=Path)
    probes.add_argument("--task", default=None)
    probes.add_argument("--model", default=None)
    probes.set_defaults(handler=cmd_probes)
    report = commands.add_parser("report", help="(re)write RUN_DIR/report/index.html from the run's tables")
    report.add_argument("run_dir", type=Path)
    report.set_defaults(handler=cmd_report)
    serve = commands.add_parser("serve", help="serve the merge-eval/qwen and merge-eval/smollm2 deployments")
    serve.set_defaults(handler=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except _user_errors() as error:
        problems = getattr(error, "problems", None) or [str(error)]
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
