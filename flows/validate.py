"""What a config points at, checked before any work: `merge-eval validate` and `merge-eval run` both call
`validate_config` before Prefect starts, so a run that cannot succeed fails in seconds and writes nothing.

`flows.config` checks the config's own shape; this module checks the world it names: embedded members, local
model folders (config.json, whole safetensors, a tokenizer), hub models (offline: a cached snapshot with config,
weights and tokenizer; online: the repo's metadata: exists, readable with the user's token, revision; no weights are
downloaded), the probing data, the device, the run directory and the room on its disk for the run's plan
(flows.plan). Every problem is one line naming the field and its value.
"""

from __future__ import annotations

import os
from pathlib import Path

from flows.config import ConfigError, ExperimentConfig, load_config
from evaluation.minimal_pairs import MinimalPairError
from merging.checkpoints import EMBEDDED_PREFIX, checkpoint_problems
from merging.hub import hub_problems
from probing.holmes import HolmesError


def default_run_dir(config: ExperimentConfig) -> Path:
    return Path("runs") / config.name


def _looks_like_path(source: str) -> bool:
    """A source the user meant as a folder: absolute, home- or dot-relative, or deeper than `owner/name`."""
    return source.startswith(("/", "~", "./", "../")) or "\\" in source or source.count("/") > 1


def source_problems(config: ExperimentConfig) -> list[str]:
    """Each `models[i].source`: an embedded member, an existing model folder, or a hub model a run can have."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from merging.family import MEMBERS, FamilyError, gguf_path

    problems = []
    for i, spec in enumerate(config.models):
        field, source = f"models[{i}].source", spec.source
        path = Path(source).expanduser()
        if source.startswith(EMBEDDED_PREFIX):
            member = source.removeprefix(EMBEDDED_PREFIX)
            if member not in MEMBERS:
                problems.append(f"{field}: {source!r} is not an embedded model; the family is "
                                f"{', '.join(EMBEDDED_PREFIX + m for m in MEMBERS)}")
        elif path.exists():
            problems += [f"{field}: {problem}" for problem in
                         checkpoint_problems(path, config.allow_pickle, config.trust_remote_code)]
        elif _looks_like_path(source):
            problems.append(f"{field}: folder {source!r} does not exist")
        else:
            try:
                validate_repo_id(source)
            except HFValidationError as error:
                problems.append(f"{field}: {source!r} is neither an existing folder nor a hub id "
                                f"({str(error).splitlines()[0]})")
            else:
                problems += [f"{field}: {problem}" for problem in
                             hub_problems(source, spec.revision, config.allow_pickle, config.trust_remote_code)]
    if any(spec.source.startswith(EMBEDDED_PREFIX) for spec in config.models):
        try:
            gguf_path()
        except FamilyError as error:
            problems.append(f"models: the embedded family needs its package: {error}")
    return problems


def minimal_pair_problems(config: ExperimentConfig) -> list[str]:
    """Each `minimal_pairs` source is a folder in BLiMP's layout whose selected paradigms read cleanly (every line:
    a read whole here fails in seconds, not hours into a run)."""
    problems = []
    for i, (spec, selection) in enumerate(zip(config.minimal_pairs, config.pair_selections())):
        try:
            selection.read()
        except MinimalPairError as error:
            problems.append(f"minimal_pairs[{i}].source={spec.source!r}: {error}")
    return problems


def probing_problems(config: ExperimentConfig) -> list[str]:
    """`probing.data` holds readable Holmes datasets, `probing.tasks` names some of them, and none is named like a
    minimal-pair task. A user's folder is read whole (a malformed CSV or YAML fails here, not hours into a run)."""
    from probing.holmes import find_tasks

    spec = config.probing
    if spec.data is None:
        return []
    try:
        tasks = find_tasks(Path(spec.data).expanduser(), spec.tasks)
    except HolmesError as error:
        return [f"probing.data={spec.data!r}: {line}" for line in error.lines()]
    try:
        pair_tasks = {p.name for selection in config.pair_selections() for p in selection.read()}
    except MinimalPairError:  # reported by minimal_pair_problems
        pair_tasks = set()
    return [f"probing.data={spec.data!r}: dataset {task.name!r} has the name of a minimal-pair paradigm's task; "
            "rename the folder or give that minimal_pairs source another `name`"
            for task in tasks if task.name in pair_tasks]


def device_problems(config: ExperimentConfig) -> list[str]:
    if config.device != "cuda":
        return []
    import torch

    return [] if torch.cuda.is_available() else ["device: 'cuda' but no CUDA GPU is available (use cpu or auto)"]


def run_dir_problems(run_dir: Path) -> list[str]:
    """The run directory can be created (or written, when it exists) without creating anything now."""
    path = Path(run_dir).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return [f"run directory {str(run_dir)!r}: {existing} is not a folder"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"run directory {str(run_dir)!r}: {existing} is not writable"]
    return []


def environment_problems(config: ExperimentConfig, run_dir: Path) -> list[str]:
    return (source_problems(config) + minimal_pair_problems(config) + probing_problems(config)
            + device_problems(config) + run_dir_problems(run_dir))


def validate_config(path: str | Path, run_dir: str | Path | None = None) -> tuple[ExperimentConfig, Path]:
    """(config, run directory) when the config and everything it names can be used; else `ConfigError` with
    one line per problem, config mistakes first (the environment is checked only for a well-formed config)."""
    from flows.plan import disk_problems

    config = load_config(path)
    root = Path(run_dir) if run_dir else default_run_dir(config)
    problems = environment_problems(config, root)
    problems = problems or disk_problems(config, root)  # the disk plan needs every source readable
    if problems:
        raise ConfigError([f"{path}: {problem}" for problem in problems])
    return config, root
