"""How the flow's per-model tasks run and fail: the configured task runner, GPU claims, retries, failure records.

A model whose merge, load/behaviour/capture step or probing fails is recorded as a `Failure` (failures.parquet)
and left out of the later stages; the rest of the run completes and the flow then ends Failed with
`ModelsFailed`, which the CLI turns into a summary and exit 1. Stage code knows nothing of this module.
"""

from __future__ import annotations

import logging
import re
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager

import polars as pl
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from flows.config import OrchestrationSpec
from runstore.errors import UserError, describe
from runstore.tables import CONTRACT_COLUMNS


@dataclass(frozen=True)
class Failure:
    """One model that did not get through `stage`, and why (one line)."""

    model: str
    stage: str
    reason: str

    def line(self) -> str:
        return f"{self.model} ({self.stage}): {self.reason}"


class ModelsFailed(Exception):
    """The run finished for every other model; these failed (not a user mistake of the config: exit 1)."""

    def __init__(self, failures: list[Failure], run_dir: str):
        self.failures, self.run_dir = failures, run_dir
        super().__init__(f"{len(failures)} model stage(s) failed: " + "; ".join(f.line() for f in failures))


def failures_frame(failures: list[Failure]) -> pl.DataFrame:
    return pl.DataFrame([vars(f) for f in failures], schema={c: pl.String for c in CONTRACT_COLUMNS["failures"]})


def task_runner(spec: OrchestrationSpec) -> TaskRunner:
    """`default`: one task at a time in a worker thread (a model at a time in memory, as before concurrency);
    `dask`: prefect-dask on the cluster at `address`, or on a LocalCluster of worker processes."""
    if spec.task_runner == "default":
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    if spec.address:
        return DaskTaskRunner(address=spec.address)
    # The scheduler's HTTP server (dashboard, health) cannot be switched off: keep it on the loopback interface,
    # on a free port, like every server here. Its lifecycle lines (workers registered, closed) say nothing to a user.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    workers = {"n_workers": spec.n_workers, "threads_per_worker": spec.threads_per_worker, "processes": True,
               "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}
    if (api := temporary_server_url()) is not None:
        workers["env"] = {"PREFECT_API_URL": api}
    if spec.gpus_per_task:
        workers["resources"] = {"GPU": spec.gpus_per_task}
    return DaskTaskRunner(cluster_kwargs=workers)


def temporary_server_url() -> str | None:
    """The API of the temporary server this process runs when no PREFECT_API_URL is set (`merge-eval run`);
    LocalCluster workers are told to use it, or each would start a temporary server of its own (seen: one per
    worker, each a minute or more to start on a busy machine, and its task runs missing from this run's server)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one this process's client started (one instance per port; None: any)
    server.start()  # a no-op when running, as it is inside the flow
    return server.api_url


def gpu_claim(spec: OrchestrationSpec) -> ContextManager:
    """Around a model task's `.submit()`: on Dask, claim `gpus_per_task` of a worker's `GPU` resource, so that
    each GPU runs one model at a time; elsewhere nothing (the thread runner has no resources)."""
    if spec.task_runner != "dask" or not spec.gpus_per_task:
        return nullcontext()
    import dask

    return dask.annotate(resources={"GPU": spec.gpus_per_task})


def retry_options(spec: OrchestrationSpec) -> dict:
    """Task options for a model-level task: `retries` with exponential backoff, never for a `UserError`."""
    return {"retries": spec.retries, "retry_delay_seconds": exponential_backoff(spec.retry_delay_seconds)(spec.retries)
            if spec.retries else 0, "retry_condition_fn": retry_unless_user_error}


def retry_unless_user_error(task, task_run, state) -> bool:
    """A user mistake (missing file, bad checkpoint) fails the same way every time; anything else may be
    transient (an out-of-memory kill of a neighbour, a network file system hiccup) and is worth a retry."""
    return not isinstance(state.result(raise_on_failure=False), UserError)


def gather(futures: dict[str, PrefectFuture], stage: str, failures: list[Failure]) -> dict[str, Any]:
    """Each model's result from its `stage` future; a model whose task failed gets a `Failure` (appended to
    `failures`) and no result. A model with a failure already recorded is skipped silently: its task waited for
    the failed one and never ran. When every model failed on a `UserError`, the mistake is the user's, not a
    model's: it is raised, for the CLI to print with exit 2."""
    results, errors = {}, []
    for model, future in futures.items():
        future.wait()
        state = future.state
        if state.is_completed():
            results[model] = future.result()
        elif not any(f.model == model for f in failures):
            error = state.result(raise_on_failure=False) if state.is_failed() or state.is_crashed() else None
            errors.append(error)
            failures.append(Failure(model, stage, describe(error) if isinstance(error, BaseException)
                                    else state.message or state.name))
    if futures and not results and errors and all(isinstance(e, UserError) for e in errors):
        raise errors[0]
    return results


def artifact_key(name: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes; one key per config keeps a history."""
    return re.sub(r"[^a-z0-9-]+", "-", f"merge-eval-{name}-{what}".lower()).strip("-")
