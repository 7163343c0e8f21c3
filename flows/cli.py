"""`merge-eval` command line: validate, plan, run, serve (and the inspection commands the stages add).

User mistakes (bad config, missing model, incompatible parents) print one line per problem and exit 2; only
genuine bugs show a traceback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from flows import console
from runstore.errors import UserError, describe, is_disk_full

USAGE_ERROR = 2
MODELS_FAILED = 1
VERBOSE_HELP = ("show everything the libraries print (their warnings, progress bars), each stage's per-task lines "
                f"and the stack of a user mistake; the same as {console.VERBOSE}=1")


def _offline_defaults() -> None:
    """Quiet, local-first defaults; anything the user set explicitly wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Prefect's default 20 s for its temporary in-process server is too short on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # Servers listen on the loopback interface only, whatever Prefect's own defaults become.
    os.environ.setdefault("PREFECT_SERVER_API_HOST", "127.0.0.1")
    os.environ.setdefault("PREFECT_RUNNER_SERVER_HOST", "127.0.0.1")
    # Stage code logs through the standard library (it knows nothing of Prefect); show it in the flow's log.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "merge_eval")


def cmd_validate(args: argparse.Namespace) -> int:
    from flows.validate import validate_config

    config, _ = validate_config(args.config, args.run_dir)
    print(f"{args.config}: ok ({len(config.models)} models, {len(config.merge_names)} merges)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from flows.validate import validate_config

    config, run_dir = validate_config(args.config, args.run_dir)  # fail fast, before Prefect starts its server
    from flows.orchestration import ModelsFailed
    from flows.pipeline import merge_eval
    from runstore.run_dir import RunDir

    fresh = not run_dir.exists()
    try:
        with RunDir(run_dir).lock():  # before Prefect starts: a second run on this directory is refused at once
            merge_eval(config_path=str(args.config), run_dir=str(run_dir))
    except UserError:
        if fresh:
            _discard_if_nothing_made(run_dir)
        raise
    except ModelsFailed as failed:
        print(f"failed: {len(failed.failures)} model stage(s); results of the others are in {run_dir} "
              f"(tables/failures.parquet lists these):", file=sys.stderr)
        for failure in failed.failures:
            print(f"  {_printable(failure.line())}", file=sys.stderr)
        _print_results(run_dir)
        return MODELS_FAILED
    _print_results(run_dir)
    return 0


def _print_results(run_dir: Path) -> None:
    print(f"results in {run_dir}")
    report = Path(run_dir) / "report" / "index.html"
    if report.is_file():
        print(f"report: {report}")


def _discard_if_nothing_made(run_dir: Path) -> None:
    """Remove a run directory this run created when it failed before making anything but its bookkeeping (config,
    lock, ledger) and links to the parents; anything more (a merge, a cache entry) is kept for the next run to
    resume from."""
    from runstore.run_dir import RunDir

    kept = RunDir(run_dir).bookkeeping()
    made = [p for p in run_dir.rglob("*") if not (p.is_symlink() or p.is_dir() or p in kept)]
    if not made:
        shutil.rmtree(run_dir, ignore_errors=True)


def cmd_plan(args: argparse.Namespace) -> int:
    from flows.plan import main as plan_main

    return plan_main(args.config, args.device_rate)


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
    validate.add_argument("--run-dir", type=Path, default=None, help="checked for writing; default: runs/<name>/")
    validate.set_defaults(handler=cmd_validate)
    run = commands.add_parser("run", help="run the whole pipeline (a Prefect flow, in-process)")
    run.add_argument("config", type=Path)
    run.add_argument("--run-dir", type=Path, default=None, help="default: runs/<config name>/")
    run.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    run.set_defaults(handler=cmd_run)
    plan = commands.add_parser("plan", help="time, peak memory, disk and forward-pass work per stage, before a run")
    plan.add_argument("config", type=Path)
    plan.add_argument("--device-rate", type=float, default=None, metavar="FLOPS",
                      help="the device's forward FLOP/s (e.g. 400e12) instead of a short calibration here")
    plan.set_defaults(handler=cmd_plan)
    probes = commands.add_parser("probes", help="per-layer probe curves; no --task/--model: list tasks and models")
    probes.add_argument("run_dir", type=Path)
    probes.add_argument("--task", default=None)
    probes.add_argument("--model", default=None)
    probes.set_defaults(handler=cmd_probes)
    report = commands.add_parser("report", help="(re)write RUN_DIR/report/index.html from the run's tables")
    report.add_argument("run_dir", type=Path)
    report.set_defaults(handler=cmd_report)
    serve = commands.add_parser("serve", help="serve the merge-eval/qwen and merge-eval/smollm2 deployments")
    serve.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    serve.set_defaults(handler=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    args = build_parser().parse_args(argv)
    console.install(verbose_flag=getattr(args, "verbose", False))  # before any library import reads its switch
    try:
        return args.handler(args)
    except UserError as error:
        lines = error.lines()
    except OSError as error:  # a full disk outside our writers (a library's own file): say so, no traceback
        if not is_disk_full(error):
            raise
        lines = [f"no space left on device ({describe(error)})"]
    for line in lines:
        print(f"error: {_printable(line)}", file=sys.stderr)
    return USAGE_ERROR


def _printable(line: str) -> str:
    """One problem, one terminal line: control and line-separator characters from the user's own values (a YAML
    key, a CSV cell) are shown escaped rather than breaking the line."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode() for c in line)


if __name__ == "__main__":
    sys.exit(main())
