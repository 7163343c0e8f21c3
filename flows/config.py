"""The experiment config: one pydantic model, validated whole before any work starts.

`load_config` turns every user mistake (missing file, YAML syntax, unknown key, bad value, dangling reference)
into `ConfigError`, whose `problems` are one line each naming the field and the offending value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merging.methods import METHODS
from runstore.errors import UserError

Precision = Literal["float32", "bfloat16", "float16"]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class ConfigError(UserError):
    """A config that cannot be used; `problems` holds one human-readable line per mistake."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    """A parent model. `source`: `embedded:<member>` (the bundled SmolLM2 family), a local folder, or a hub id."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    source: str
    revision: str | None = None


class MethodSpec(Strict):
    method: str
    label: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None  # model-name suffix; defaults to `method`
    parameters: dict[str, float] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown merge method {value!r}; known: {', '.join(METHODS)}")
        return value

    @model_validator(mode="after")
    def _valid_parameters(self) -> MethodSpec:
        method = METHODS[self.method]
        problems = []
        for key, value in self.parameters.items():
            param = method.param(key)
            problem = f"unknown parameter for {self.method}" if param is None else param.check(value)
            if problem:
                problems.append(f"parameters.{key}={value!r}: {problem}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def suffix(self) -> str:
        return self.label or self.method


class MergeSpec(Strict):
    """Every parent group merged by every method: `instruct+math/slerp`, ... (`merges` is one such block, or a
    list of them when different parent groups need different methods: a dose-response sweep on one pair beside
    one method over many pairs)."""

    parents: list[Annotated[list[str], Field(min_length=2)]] = Field(default_factory=list)
    methods: list[MethodSpec] = Field(default_factory=list)


class BehaviorSpec(Strict):
    """lm-eval suites by name (evaluation.suites.SUITES: `offline` bundled, `leaderboard` needs the hub)."""

    suites: Annotated[list[str], Field(min_length=1)] = Field(default_factory=lambda: ["offline"])
    batch_size: Annotated[int, Field(ge=1)] = 16
    limit: Annotated[int, Field(ge=1)] | None = None  # items per task, for quick runs

    @field_validator("suites")
    @classmethod
    def _known_suites(cls, value: list[str]) -> list[str]:
        from evaluation.suites import SUITES

        unknown = [name for name in value if name not in SUITES]
        if unknown:
            raise ValueError(f"unknown suite(s) {', '.join(map(repr, unknown))}; known: {', '.join(SUITES)}")
        if len(set(value)) != len(value):
            raise ValueError("a suite is listed twice")
        return value


class MinimalPairSpec(Strict):
    """One minimal-pair source, scored inside (a probe per paradigm, every layer) and outside (lm-eval
    log-likelihood per pair): `bundled` (the project's generated suite, probing/suite) or a folder in BLiMP's
    layout (`data/<UID>.jsonl`, e.g. a BLiMP download). Tasks are named `<name>-<UID>`; `name` defaults to `suite`
    for the bundled suite and `blimp` for a folder. `paradigms`: UIDs to use (default all); `pairs`: the first
    that many pairs of each (default all)."""

    source: str
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.]*$")] | None = None  # no "-": ends the prefix
    paradigms: Annotated[list[str], Field(min_length=1)] | None = None
    pairs: Annotated[int, Field(ge=3)] | None = None  # a probe needs train, dev and test pairs

    @property
    def source_name(self) -> str:
        return self.name or ("suite" if self.source == "bundled" else "blimp")


class ProbingSpec(Strict):
    """Probe settings for every probing task; `data` adds a folder of Holmes/FlashHolmes datasets (`tasks`: some of
    them by name) to the minimal-pair paradigms, which the top-level `minimal_pairs` selects."""

    data: str | None = None  # a folder of Holmes/FlashHolmes datasets
    tasks: list[str] | None = None  # None: every dataset under `data`
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    # capture: tokens per forward pass, padding included (= probing.capture.DEFAULT_BATCH_TOKENS; config stays torch-free)
    batch_tokens: Annotated[int, Field(ge=16)] = 1024
    max_length: Annotated[int, Field(ge=8)] = 128
    controls: bool = True
    mdl: bool = False
    pooling: Literal["mean", "last"] = "mean"  # sentence inputs: masked mean or last token (spans: always mean)

    @field_validator("data")
    @classmethod
    def _not_bundled(cls, value: str | None) -> str | None:
        if value == "bundled":
            raise ValueError("the bundled suite is now minimal pairs, scored inside and outside: use the top-level "
                             "`minimal_pairs: [{source: bundled}]` (the default) and leave probing.data to Holmes "
                             "folders")
        return value

    @model_validator(mode="after")
    def _tasks_need_data(self) -> ProbingSpec:
        if self.tasks is not None and self.data is None:
            raise ValueError("probing.tasks picks datasets of probing.data, which is not set (minimal-pair "
                             "paradigms are picked by minimal_pairs[].paradigms)")
        return self


class SimilaritySpec(Strict):
    """Selector features: weight-space (streamed from checkpoints) and functional (from the unlabeled set's
    captures: `tokens` tokens in windows of `window`; KL from each model's `top_k` next-token log-probs)."""

    weights: bool = True
    functional: bool = True
    tokens: Annotated[int, Field(ge=16)] = 10_000
    window: Annotated[int, Field(ge=8)] = 128
    top_k: Annotated[int, Field(ge=1)] = 1024

    @model_validator(mode="after")
    def _whole_window(self) -> SimilaritySpec:
        if self.tokens < self.window:
            raise ValueError(f"similarity.tokens={self.tokens} is less than one window ({self.window})")
        return self


class OrchestrationSpec(Strict):
    """How the flow's per-model tasks run: `default` is Prefect's thread-pool runner with one worker (one model at
    a time, as a 2-core box or a single GPU wants); `dask` is prefect-dask's runner on a LocalCluster of
    `n_workers` processes, or on the existing cluster at `address`. `gpus_per_task` > 0 makes each model task claim
    that many units of its Dask worker's `GPU` resource (start workers with `--resources GPU=1`, one per GPU), and
    gives LocalCluster workers that many each. A model task that fails on anything but a user mistake is retried
    `retries` times, waiting `retry_delay_seconds` and then twice as long each further time."""

    task_runner: Literal["default", "dask"] = "default"
    address: str | None = None
    n_workers: Annotated[int, Field(ge=1)] = 2
    threads_per_worker: Annotated[int, Field(ge=1)] = 1
    gpus_per_task: Annotated[int, Field(ge=0)] = 0
    retries: Annotated[int, Field(ge=0)] = 1
    retry_delay_seconds: Annotated[float, Field(ge=0)] = 10.0

    @model_validator(mode="after")
    def _dask_options_need_dask(self) -> OrchestrationSpec:
        if self.task_runner != "dask":
            given = [key for key in ("address", "n_workers", "threads_per_worker", "gpus_per_task")
                     if key in self.model_fields_set]
            if given:
                raise ValueError(f"{given[0]} is used only with task_runner: dask "
                                 f"(got task_runner: {self.task_runner})")
        local = [key for key in ("n_workers", "threads_per_worker") if key in self.model_fields_set]
        if self.address and local:
            raise ValueError(f"{local[0]} sizes a LocalCluster; the cluster at address {self.address!r} has its "
                             f"own workers")
        return self


class KnownEffect(Strict):
    """An effect planted on purpose: the findings open by saying whether the run found it."""

    model: str
    tasks: list[str] = Field(default_factory=list)  # probing/behaviour task names (the same string inside and out)
    phenomena: list[str] = Field(default_factory=list)
    direction: Literal["worse", "better"] = "worse"
    layers: tuple[int, int] | None = None  # expected first..last layer of the loss inside

    @model_validator(mode="after")
    def _names_something(self) -> KnownEffect:
        if not self.tasks and not self.phenomena:
            raise ValueError(f"known effect of {self.model!r} names no tasks and no phenomena")
        return self


class ExperimentConfig(Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: str = ""
    seed: int = 0
    precision: Precision = "float32"  # one precision for behaviour and internals alike
    device: Literal["cpu", "cuda", "auto"] = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # safetensors only unless a config opts in
    models: Annotated[list[ModelSpec], Field(min_length=1)]
    base: str
    merges: list[MergeSpec] = Field(default_factory=list)  # a single block may be written without the list
    behavior: BehaviorSpec = Field(default_factory=BehaviorSpec)
    # scored inside (probes, every layer) and outside (lm-eval log-likelihood) on the same sentences
    minimal_pairs: list[MinimalPairSpec] = Field(default_factory=lambda: [MinimalPairSpec(source="bundled")])
    probing: ProbingSpec = Field(default_factory=ProbingSpec)
    similarity: SimilaritySpec = Field(default_factory=SimilaritySpec)
    orchestration: OrchestrationSpec = Field(default_factory=OrchestrationSpec)
    # effects planted on purpose (the known answer the findings report first; reports.known)
    known_effects: list[KnownEffect] = Field(default_factory=list)

    @field_validator("merges", mode="before")
    @classmethod
    def _one_block_or_several(cls, value: object) -> object:
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _references(self) -> ExperimentConfig:
        problems = reference_problems(self.model_dump())
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def merge_specs(self) -> list[tuple[list[str], MethodSpec]]:
        """(parent group, method) of every merge, in config order."""
        return [(group, method) for block in self.merges for group in block.parents for method in block.methods]

    @property
    def merge_names(self) -> list[str]:
        return [merge_name(group, method.suffix) for group, method in self.merge_specs()]

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models] + self.merge_names

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)

    def pair_selections(self) -> tuple:
        """`minimal_pairs` as evaluation.minimal_pairs.PairSelection (paths as given, like every path here:
        relative to the working directory)."""
        from evaluation.minimal_pairs import PairSelection
        from probing.minimal_pair_tasks import BUNDLED_DIR

        return tuple(PairSelection(spec.source_name, str(BUNDLED_DIR if spec.source == "bundled" else
                                                         Path(spec.source).expanduser()),
                                   tuple(spec.paradigms) if spec.paradigms else None, spec.pairs)
                     for spec in self.minimal_pairs)


def _duplicates(values: list) -> list:
    return sorted({v for v in values if values.count(v) > 1}, key=str)


def reference_problems(data: dict) -> list[str]:
    """Cross-field mistakes (dangling names, duplicates, slerp arity), found on raw data too, so that they are
    reported in the same pass as field errors rather than only after those are fixed."""
    def entries(value) -> list:
        return value if isinstance(value, list) else []

    def text(value) -> str | None:  # names of other types are reported by field validation
        return value if isinstance(value, str) else None

    models = [text(m.get("name")) for m in entries(data.get("models")) if isinstance(m, dict)]
    problems = [f"models: duplicate model name {name!r}" for name in _duplicates(models) if name is not None]
    sources = [m for m in entries(data.get("minimal_pairs")) if isinstance(m, dict) and text(m.get("source"))]
    names = [text(m.get("name")) or ("suite" if m["source"] == "bundled" else "blimp") for m in sources]
    problems += [f"minimal_pairs: two sources named {name!r} (their tasks would share names): give one a `name`"
                 for name in _duplicates(names)]
    if "base" in data and data["base"] not in models:
        problems.append(f"base: {data['base']!r} is not one of the models ({', '.join(map(str, models))})")
    raw_merges = data.get("merges")
    blocks = [("merges", raw_merges)] if isinstance(raw_merges, dict) else \
        [(f"merges[{k}]", block) for k, block in enumerate(entries(raw_merges)) if isinstance(block, dict)]
    merge_models = []
    for where, block in blocks:
        groups = [g for g in entries(block.get("parents")) if isinstance(g, list)]
        methods = [m for m in entries(block.get("methods")) if isinstance(m, dict)]
        problems += _merge_block_problems(where, groups, methods, models)
        suffixes = [text(m.get("label")) or text(m.get("method")) for m in methods]
        merge_models += sorted({merge_name(list(map(str, g)), s) for g in groups for s in suffixes if s is not None})
    problems += [f"merges: the merge {name!r} is configured in two blocks: give one a distinct label"
                 for name in _duplicates(merge_models)]
    known = set(models) | set(merge_models)
    for i, effect in enumerate(entries(data.get("known_effects"))):
        if isinstance(effect, dict) and text(effect.get("model")) and effect["model"] not in known:
            problems.append(f"known_effects[{i}].model: {effect['model']!r} is not one of the models or merges")
    return problems


def _merge_block_problems(where: str, groups: list[list], methods: list[dict], models: list[str | None]) -> list[str]:
    """Dangling or repeated parents, duplicate labels and slerp-style arity within one `merges` block."""
    problems = []
    for i, group in enumerate(groups):
        problems += [f"{where}.parents[{i}]: {p!r} is not one of the models" for p in group if p not in models]
        if len(set(map(str, group))) != len(group):
            problems.append(f"{where}.parents[{i}]: a parent is listed twice in {group}")
    suffixes = [m.get("label") or m.get("method") for m in methods]
    problems += [f"{where}.methods: duplicate model names */{s}: give each a distinct label"
                 for s in _duplicates(suffixes) if isinstance(s, str)]
    for i, spec in enumerate(methods):
        method = METHODS.get(spec.get("method")) if isinstance(spec.get("method"), str) else None
        for j, group in enumerate(groups):
            if method and method.exactly_two and len(group) != 2:
                problems.append(f"{where}.methods[{i}] ({method.name}): needs exactly 2 parents, "
                                f"{where}.parents[{j}] has {len(group)}")
    return problems


def merge_name(parents: list[str], suffix: str) -> str:
    return f"{'+'.join(parents)}/{suffix}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of duplicate mapping keys silently; a config with two `models:` is a mistake."""


def _mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # a list or mapping as a key: construct_mapping names it
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _lookup(data: object, loc: tuple) -> object:
    for part in loc:
        try:
            data = data[part]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return None
    return data


# keys of earlier releases, so that an old config says what to write instead
RENAMED_KEYS = {"probing.batch_size": "probing.batch_tokens, a token budget per forward pass, padding included"}


def _problems(error: ValidationError, data: object) -> list[str]:
    problems = []
    one_block = isinstance(data, dict) and isinstance(data.get("merges"), dict)
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith(("function-", "list["))))
        if one_block and loc[:2] == ("merges", 0):  # named as written: `merges.methods[0]`, not `merges[0]...`
            loc = ("merges", *loc[2:])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            renamed = RENAMED_KEYS.get(_location(loc))
            problems.append(f"{_location(loc)}: unknown key" + (f" (renamed: use {renamed})" if renamed else ""))
        elif item["type"] == "value_error" and not loc:
            problems.extend(message.splitlines())
        else:
            value = _lookup(data, loc)
            shown = "" if item["type"] in {"missing", "value_error"} else f" (got {value!r})"
            problems.append(f"{_location(loc)}: {message}{shown}")
    return problems


def parse_config(data: object, origin: str = "config") -> ExperimentConfig:
    if not isinstance(data, dict):
        raise ConfigError([f"{origin}: expected a mapping at the top level, got {type(data).__name__}"])
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as error:
        problems = _problems(error, data)
        problems += [p for p in reference_problems(data) if p not in problems]
        raise ConfigError([f"{origin}: {p}" for p in problems]) from None


def load_config(path: str | Path) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such config file"])
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError([f"{path}:{where}: YAML error: {reason}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not a UTF-8 text file"]) from None
    return parse_config(data, str(path))
