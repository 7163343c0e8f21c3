"""What a run prints: one progress line per stage and model, and the warnings that matter to the user.

Libraries' chatter that tells a merge-eval user nothing is dropped where it is made: a filter on the one logger
that emits it, matching its message, so every other record of that logger (and every other warning) still shows.
Third-party progress bars (lm-eval, datasets, transformers) are switched off through their own documented
switches; the stages log their per-task detail at DEBUG. `MERGE_EVAL_VERBOSE=1` (`merge-eval run --verbose`)
keeps all of it.

`install()` is idempotent and cheap (no heavy import): the CLI calls it before anything imports tqdm or the
Hugging Face libraries (their switches are environment variables read at import, which also reach the processes
a run starts: Prefect's runner, Dask workers), and the flow calls it again for runs started outside the CLI.
"""

from __future__ import annotations

import logging
import os
import sys

from runstore.errors import UserError

VERBOSE = "MERGE_EVAL_VERBOSE"

# (logger, text in the message) of records that say nothing to a merge-eval user.
NOISE = (
    # lm-eval's advice to its own CLI's users, once per task per model: our suites take no task metadata.
    ("lm_eval.api.task", "Custom kwargs can be passed to `--metadata`"),
    # The per-model step hands lm-eval its already-loaded model on purpose (one load for behaviour and captures).
    ("lm_eval.models.huggingface", "`pretrained` model kwarg is not of type `str`"),
    ("lm_eval.models.huggingface", "Passed an already-initialized model through `pretrained`"),
    # mergekit writes the merged model's config with transformers' deprecated `torch_dtype` attribute.
    ("transformers.configuration_utils", "`torch_dtype` is deprecated! Use `dtype` instead!"),
)

# Read by tqdm (every bar that does not set `disable` itself: lm-eval's request building, datasets), by
# huggingface_hub (its own bars and transformers' "Loading weights"), and by datasets, each when first imported.
QUIET_BARS = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}

# The Prefect loggers of flow and task runs: at DEBUG in verbose mode, so the stages' per-task lines show.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
# Where Prefect logs a failed task or flow run with its exception's stack.
FAILURE_LOGGERS = (*RUN_LOGGERS, "prefect.engine")


class DropMessages(logging.Filter):
    """Drops the records whose message contains one of `texts`; all others pass untouched."""

    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


class UserErrorsWithoutTraceback(logging.Filter):
    """A `UserError`'s message is the whole story (the CLI prints it again as its `error:` lines, exit 2): Prefect's
    record of the failed task or flow keeps the message and loses the stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info, record.exc_text = None, None
        return True


def verbose() -> bool:
    return os.environ.get(VERBOSE, "").strip().lower() not in ("", "0", "false", "no")


def noise_filters() -> dict[str, DropMessages]:
    """One filter per noisy logger, with every text that logger must not show."""
    texts: dict[str, tuple[str, ...]] = {}
    for logger, text in NOISE:
        texts[logger] = texts.get(logger, ()) + (text,)
    return {logger: DropMessages(found) for logger, found in texts.items()}


_FILTERS = noise_filters()
_SHORT_USER_ERRORS = UserErrorsWithoutTraceback()


def install(verbose_flag: bool = False) -> None:
    """Set the console up for a run; `verbose_flag` (the CLI's --verbose) sets MERGE_EVAL_VERBOSE for the run's
    child processes too."""
    if verbose_flag:
        os.environ[VERBOSE] = "1"
    # Stage loggers (merge_eval.*) also feed Prefect's API handler, which warns when they log outside a flow run
    # (`merge-eval report` reading a damaged cache entry): the record itself still shows on the console.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    filters = list(_FILTERS.items()) + [(name, _SHORT_USER_ERRORS) for name in FAILURE_LOGGERS]
    if verbose():
        for name, each in filters:
            logging.getLogger(name).removeFilter(each)
        for name in RUN_LOGGERS:
            logging.getLogger(name).setLevel(logging.DEBUG)
        return
    for name, each in filters:
        logging.getLogger(name).addFilter(each)  # a no-op when already there
    for variable, value in QUIET_BARS.items():
        os.environ.setdefault(variable, value)  # a user's explicit choice wins
    # Libraries already imported read their switch too late; their own functions turn the bars off.
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()

