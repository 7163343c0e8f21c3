"""`merge-eval plan CONFIG`: what a run will cost, per stage and in total, before it starts: peak memory, bytes
written under the run directory (captures counted unpacked: an upper bound), forward-pass tokens and FLOPs, and
wall time.

Everything is computed from each model's config.json (its parameter count and shapes, read from a model built on
torch's meta device: no weight is read or allocated) and the run's own inputs as the stages resolve them: the
probing tasks through `flows.pipeline.probing_tasks` (minimal pairs and Holmes data), the capture jobs through
`flows.pipeline.capture_jobs`, the behaviour requests through lm-eval's task loaders
(`evaluation.behavior.lm_eval_tasks`), all tokenised by the base model's tokenizer; so the plan follows the suite
and the config. Time comes from a short calibration on this machine (forward passes of a two-block random model of
the base's shape, a checkpoint-sized file written and read) or from a stated device rate (`--device-rate`, FLOP/s).
docs/SCALE.md explains each stage's model.

The pipeline keeps one model resident at a time (its per-model step loads it once for behaviour and every capture),
streams weights tensor by tensor for preflight, merges and weight features, and streams captures to the store.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flows.config import ExperimentConfig, load_config
from merging.checkpoints import EMBEDDED_PREFIX, TOKENIZER_FILES
from runstore.errors import UserError

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FREE_MARGIN = 1.2  # validate wants 20 % more free disk than the plan writes (caches, tables, temp files)
MERGEKIT_SHARD_BYTES = 5e9  # mergekit's default out_shard_size: a shard is held in memory until written
# Fixed costs measured on the embedded run (bench/bench_e2e.py, docs/PERFORMANCE.md "End to end"): process start
# and imports, Prefect's temporary server and shutdown; lm-eval's and mergekit's first import in the process; the
# tables, outcomes, correlations and report, which grow with the models but stay seconds.
STARTUP_S, LM_EVAL_IMPORT_S, MERGEKIT_IMPORT_S, TABLES_S_PER_MODEL = 20.0, 10.0, 6.0, 2.0
# Probe fits run on the CPU whatever the device: seconds per (layer x item x feature width) for three seeds, from
# the demo's ledger (16 bundled paradigms, 400 items, width 576, 31 layers: 5.1-6.3 s a model, 2026-12-05). The
# older suite (25 tasks, ~150 items: 0.23 s a task) comes out at 0.56x its measured time on this rate; an item²
# model fitted there put the new suite at 6x its measured time. Not calibrated on random features: the solver
# converges 30-60x slower on them than on real residual streams.
PROBE_SECONDS_PER_UNIT = 4.8e-8
CALIBRATION_S = 5.0  # forward passes of the calibration model, at least
SHAPES = "shapes"  # the user's merge-eval cache's folder of remembered model shapes (remembered_shape)


class PlanError(UserError):
    """A model the plan cannot size (unreadable config.json, no tokenizer, parents of different sizes)."""


@dataclass(frozen=True)
class Shape:
    """What the plan needs of an architecture: parameter counts and the sizes of the activations it keeps."""

    params: int  # every parameter (tied embeddings once)
    matmul: int  # weights multiplied per token, output head excluded
    head: int  # output head weights (vocab x hidden)
    largest: int  # elements of the largest tensor
    layers: int
    hidden: int
    heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: dict, trust_remote_code: bool = False) -> Shape:
        """Counts from the architecture transformers builds for this config on the meta device (no memory)."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(**config) if "auto_map" not in config else \
            AutoConfig.from_dict(config, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
        head = model.get_output_embeddings()
        linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
        text = cfg.get_text_config()
        heads = text.num_attention_heads
        return cls(params=sum(p.numel() for p in model.parameters()), matmul=sum(m.weight.numel() for m in linear),
                   head=head.weight.numel(), largest=max(p.numel() for p in model.parameters()),
                   layers=text.num_hidden_layers, hidden=text.hidden_size, heads=heads,
                   head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=text.vocab_size)

    def flops(self, tokens: int, attended: float, logits: bool) -> float:
        """Forward FLOPs: 2 per weight per token, the head's only where logits are computed, and attention's scores
        and mixing over `attended` (query, key) pairs per layer and head."""
        return 2 * tokens * (self.matmul + (self.head if logits else 0)) + \
            4 * attended * self.layers * self.heads * self.head_dim


@dataclass
class Work:
    """One stage's cost: seconds, the peak bytes resident beside the process's baseline, bytes written under the
    run directory, forward-pass tokens and FLOPs."""

    seconds: float = 0.0
    memory: float = 0.0
    disk: float = 0.0
    tokens: int = 0
    flops: float = 0.0
    notes: list[str] = field(default_factory=list)

    def add(self, other: Work) -> None:
        self.seconds += other.seconds
        self.memory = max(self.memory, other.memory)
        self.disk += other.disk
        self.tokens += other.tokens
        self.flops += other.flops
        self.notes += other.notes


@dataclass(frozen=True)
class Rates:
    """This machine's speeds: forward FLOP/s at the run's precision, bytes/s writing and reading a checkpoint; and
    `baseline`, the anonymous memory of a process that has imported the run's libraries (the plan's own, measured
    after it imported them)."""

    flops: float
    io: float
    source: str
    baseline: float = 0.0


# --- what the run will read ----------------------------------------------------------------------------------------

def metadata_folder(config: ExperimentConfig, name: str) -> Path:
    """A folder with the model's config.json and tokenizer: never its weights (a hub model's small files come from
    the cache offline, else are downloaded alone)."""
    spec = config.model(name)
    if spec.source.startswith(EMBEDDED_PREFIX):
        from merging.checkpoints import resolve_source

        return resolve_source(spec.source)
    path = Path(spec.source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    from merging import hub

    with hub.hub_errors(spec.source, spec.revision):
        return Path(snapshot_download(spec.source, revision=spec.revision, local_files_only=hub.offline(),
                                      allow_patterns=["*.json", "tokenizer*", "*.model", "*.txt"]))


def config_file(config: ExperimentConfig, name: str) -> Path:
    """The model's config.json alone (a hub model's from the cache offline, else that one small file
    downloaded)."""
    spec = config.model(name)
    if spec.source.startswith(EMBEDDED_PREFIX) or Path(spec.source).expanduser().is_dir():
        return metadata_folder(config, name) / "config.json"
    from huggingface_hub import hf_hub_download

    from merging import hub

    with hub.hub_errors(spec.source, spec.revision):
        return Path(hf_hub_download(spec.source, "config.json", revision=spec.revision,
                                    local_files_only=hub.offline()))


def model_shape(config: ExperimentConfig, path: Path) -> Shape:
    """The architecture's counts from a config.json (`path`, or the config.json in folder `path`); remembered
    (`remembered_shape`) unless the config brings its own code (auto_map)."""
    path = path / "config.json" if path.is_dir() else path
    try:
        model_config = json.loads(path.read_text())
        if isinstance(model_config, dict) and "auto_map" in model_config:
            return Shape.from_config(model_config, config.trust_remote_code)
        return remembered_shape(model_config)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PlanError(f"{path}: cannot size the model ({type(error).__name__}: {error})") from None


def remembered_shape(model_config: dict) -> Shape:
    """`Shape.from_config`, kept in the user's merge-eval cache (`SHAPES`) by the config, this module's code and
    the versions of transformers and torch: building even a meta-device model imports transformers' modelling
    code, ~1.5 s of every run's validation (its disk estimate) on the 2-core machine, which a run whose stages are
    all cached never needs otherwise. A memo that cannot be written is left out."""
    from importlib.metadata import version

    from merging.family import cache_root
    from runstore.atomic import atomic_write_text, read_cached
    from runstore.cache import cache_key, code_version

    key = cache_key("shape", code_version(__file__), version("transformers"), version("torch"), model_config)
    memo = cache_root() / SHAPES / f"{key}.json"
    shape = read_cached(memo, lambda found: Shape(**json.loads(found.read_text())))
    if shape is None:
        shape = Shape.from_config(model_config)
        with contextlib.suppress(OSError):
            atomic_write_text(memo, json.dumps(asdict(shape)))
    return shape


def tokenizer_of(folder: Path):
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise PlanError(f"{folder}: no tokenizer to count the run's tokens with")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def study_jobs(config: ExperimentConfig, shape: Shape) -> list:
    """The capture jobs of every model (`flows.pipeline.capture_jobs`: probe inputs, the similarity windows)."""
    from flows.pipeline import capture_jobs
    from probing.store import ModelRef

    return capture_jobs(ModelRef("plan", Path("."), "", shape.layers, shape.vocab), config)


def stored_bytes(job, shape: Shape) -> float:
    """Bytes of the values one model's capture of `job` adds to the store; no tokenizer needed: pooled rows are
    one vector each, and the reducers that keep tokens take full windows of `max_length` tokens. The store packs
    them losslessly (`probing.packed`, 1.37x smaller on SmolLM2's captures), so on disk this is an upper bound."""
    from probing.capture import Pool, TextLogLik, Tokens
    from probing.hooks import LOGITS_HOOK

    rows, window = job.inputs.n_rows, job.inputs.max_length
    stored = 0.0
    for request in job.requests:
        reducer = request.reducer
        if isinstance(reducer, Pool):
            stored += rows * shape.hidden * BYTES[reducer.dtype]
        elif isinstance(reducer, TextLogLik):  # a log-likelihood and a greedy flag per row
            stored += rows * 2 * 4
        elif isinstance(reducer, Tokens):
            stored += rows * window * shape.hidden * BYTES[reducer.dtype]
        elif request.hook == LOGITS_HOOK:  # top-k log-probs (float32), indices (int32), the rest's mass
            stored += rows * window * (reducer.k * 8 + 4)
        else:  # attention probabilities of one block, causal triangle packed
            stored += rows * shape.heads * window * (window + 1) / 2 * BYTES[reducer.dtype]
    return stored


def job_work(job, shape: Shape, tokenizer) -> dict:
    """Padded tokens, attended pairs and FLOPs of one model's capture of `job`, batched as the capture code cuts
    it, and what it holds in memory."""
    from probing.hooks import LOGITS_HOOK

    tokens = attended = window = 0
    for batch in job.inputs.batches(tokenizer, job.batch_tokens):
        size, width = batch.input_ids.shape
        tokens, attended = tokens + size * width, attended + size * width * (width + 1) / 2
        window = max(window, width)
    logits = any(r.hook == LOGITS_HOOK for r in job.requests)
    patterns = any("pattern" in r.hook for r in job.requests)
    active = (job.batch_tokens * shape.vocab * 4 * 3 if logits else 0) + \
        (job.batch_tokens * window * shape.heads * 4 * 2 if patterns else 0)
    return {"tokens": tokens, "flops": shape.flops(tokens, attended, logits), "patterns": patterns,
            "stored": stored_bytes(job, shape), "active": active}


def behaviour_requests(config: ExperimentConfig, tokenizer, answered: set[str] = frozenset()
                       ) -> tuple[list[int], int, list[str]]:
    """(lengths of every loglikelihood forward, tokens to generate, notes) of the lm-eval tasks the behaviour stage
    scores (its suites and the minimal pairs' tasks), built by lm-eval's own task loaders with the config's limit;
    less the empty-context requests for `answered` sentences, which the capture pass scores (one pass)."""
    from evaluation.behavior import lm_eval_tasks
    from flows.pipeline import behavior_settings

    lengths, generated, notes = [], 0, []
    try:
        with lm_eval_tasks(behavior_settings(config)) as (names, manager):
            tasks = manager.load(names)["tasks"]
            for task in tasks.values():
                task.build_all_requests(limit=config.behavior.limit, rank=0, world_size=1)
    except Exception as error:  # noqa: BLE001 - a suite whose data needs the dataset hub: sized as unknown
        return [], 0, [f"behaviour not sized: its tasks cannot be built here ({type(error).__name__})"]
    for task in tasks.values():
        for instance in task.instances:
            context = instance.args[0]
            if instance.request_type == "generate_until":
                lengths.append(len(tokenizer(context)["input_ids"]))
                generated += int(instance.args[1].get("max_gen_toks", 256))
            else:
                continuation = instance.args[1] if len(instance.args) > 1 else ""
                if context == "" and continuation in answered:
                    continue
                lengths.append(len(tokenizer(context + continuation)["input_ids"]))
    if generated:
        notes.append(f"behaviour generates up to {generated:,} tokens per model (max_gen_toks; stops earlier)")
    return lengths, generated, notes


def padded(lengths: list[int], batch_size: int) -> tuple[int, float, int]:
    """(padded tokens, attended pairs, longest) of lengths batched as lm-eval does: longest first."""
    ordered = sorted(lengths, reverse=True)
    tokens = attended = 0
    for begin in range(0, len(ordered), batch_size):
        chunk = ordered[begin:begin + batch_size]
        tokens += len(chunk) * chunk[0]
        attended += len(chunk) * chunk[0] * (chunk[0] + 1) / 2
    return tokens, attended, ordered[0] if ordered else 0


# --- calibration ---------------------------------------------------------------------------------------------------

def _device(config: ExperimentConfig) -> str:
    from flows.pipeline import load_options

    return load_options(config).torch_device


def calibrate(config: ExperimentConfig, base: dict, device_rate: float | None = None) -> Rates:
    """This machine's rates, measured in seconds: a forward pass of a random two-block model of the base's shape
    (`forward_rate`; `device_rate` replaces it), and a 128 MiB safetensors file written and read back."""
    import tempfile

    import torch
    from safetensors.torch import load_file, save_file

    from flows.pipeline import load_options

    options = load_options(config)
    measured = device_rate or forward_rate(config, base, options)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "w.safetensors"
        tensor = torch.zeros(32 << 20, dtype=torch.float32)  # 128 MiB
        started = time.perf_counter()
        save_file({"w": tensor}, str(path))
        load_file(str(path))["w"].sum()
        io = 2 * tensor.numel() * 4 / (time.perf_counter() - started)
    return Rates(measured, io,
                 f"stated {device_rate:.3g} FLOP/s" if device_rate else
                 f"measured {measured / 1e9:.1f} GFLOP/s on {options.torch_device} ({config.precision})",
                 anonymous_memory())


def forward_rate(config: ExperimentConfig, base: dict, options) -> float:
    """FLOP/s of a forward pass of a random two-block model of the base's shape (vocab cut to 8,192) at the run's
    precision on its device, over one capture batch (`probing.batch_tokens` in windows of 128)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    small = dict(base, num_hidden_layers=2, vocab_size=min(8192, base.get("vocab_size", 8192)))
    small.pop("layer_types", None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        small.pop(key, None)
    cfg = AutoConfig.for_model(**small)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(options.torch_device, options.dtype).eval()
    rows, width = max(1, config.probing.batch_tokens // 128), 128
    ids = torch.randint(0, cfg.vocab_size, (rows, width), device=options.torch_device)
    best, times = float("inf"), []
    with torch.inference_mode():
        # the first pass is a warm-up; then the best pass of ~5 s: on a shared machine a short dip in load must not
        # set the rate of a run that lasts minutes (the best pass is the machine's own speed)
        while len(times) < 4 or (sum(times) < CALIBRATION_S and len(times) < 100):
            started = time.perf_counter()
            model(input_ids=ids)
            if options.torch_device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
            best = min(times[1:] or times)
    return Shape.from_config(small).flops(rows * width, rows * width * (width + 1) / 2, True) / best


def parent_bytes(config: ExperimentConfig, shape: Shape) -> dict[str, float]:
    """Each parent's weights at the run's precision. A parent may hold more tensors than the base (an untied output
    head, biases: the number_erased child), but every forward-pass and store figure is the base's, so a parent
    whose layers, widths, heads or vocabulary differ is refused."""
    sizes = {}
    for spec in config.models:
        other = model_shape(config, config_file(config, spec.name))
        differ = [name for name in ("layers", "hidden", "heads", "head_dim", "vocab")
                  if getattr(other, name) != getattr(shape, name)]
        if differ:
            raise PlanError(f"models: {spec.name!r} differs from the base in {', '.join(differ)} "
                            f"({', '.join(f'{getattr(other, n)} vs {getattr(shape, n)}' for n in differ)}): "
                            "the plan sizes every model's forward pass as the base's")
        sizes[spec.name] = other.params * BYTES[config.precision]
    return sizes


def anonymous_memory() -> float:
    """This process's resident memory less file-backed pages: what must fit in RAM. Mapped checkpoint pages
    (safetensors files are read through mmap) are page cache the kernel can drop, so they are not counted."""
    import psutil

    info = psutil.Process().memory_info()
    return float(info.rss - info.shared)


def plan(config: ExperimentConfig, device_rate: float | None = None, rates: Rates | None = None) -> dict:
    """Per stage and in total: seconds, peak memory (bytes), bytes written under the run directory, tokens, FLOPs."""
    from flows.pipeline import probing_tasks
    from probing.capture import probe_inputs

    folder = metadata_folder(config, config.base)
    base = json.loads((folder / "config.json").read_text())
    shape, tokenizer = model_shape(config, folder), tokenizer_of(folder)
    sizes = parent_bytes(config, shape)
    parents_bytes = sum(sizes.values())
    tasks = probing_tasks(config)
    rates = rates or calibrate(config, base, device_rate)
    n_models = len(config.model_names)
    n_merges, n_parents = len(config.merge_names), len(config.models)
    weights = shape.params * BYTES[config.precision]  # a merge's, and the base's
    every_model = parents_bytes + n_merges * weights  # every model of the run, each at its own size
    resident = max([weights, *sizes.values()])  # the largest model, the one loaded at a time
    stages: dict[str, Work] = {}

    parents = Work(notes=[f"{n_parents} parent(s) of {shape.params / 1e9:.2f}B parameters (the base), "
                          f"{parents_bytes / 1e9:.2f} GB in all at {config.precision}"])
    parents.seconds = parents_bytes / rates.io  # preflight streams every parent once
    parents.memory = shape.largest * 4 * 2
    stages["parents + preflight"] = parents

    merges = Work()
    if n_merges:
        group = max(len(parents) for parents, _ in config.merge_specs())
        merges.seconds = MERGEKIT_IMPORT_S + n_merges * (group + 2) * weights / rates.io
        merges.memory = min(weights, MERGEKIT_SHARD_BYTES) + (group + 2) * shape.largest * 4
        merges.disk = n_merges * weights
    stages["merges"] = merges

    scored = {text for task in tasks if task.scored for (text,) in task.inputs}  # one sentence per item
    lengths, generated, notes = behaviour_requests(config, tokenizer, scored)
    b_tokens, b_attended, longest = padded(lengths, config.behavior.batch_size)
    behaviour = Work(tokens=b_tokens + generated, notes=notes)
    behaviour.flops = shape.flops(b_tokens, b_attended, True) + 2 * generated * (shape.matmul + shape.head)
    behaviour.seconds = LM_EVAL_IMPORT_S + n_models * behaviour.flops / rates.flops
    behaviour.memory = resident + 3 * min(config.behavior.batch_size, len(lengths) or 1) * longest * shape.vocab * 4
    behaviour.flops *= n_models
    behaviour.tokens *= n_models
    stages["behaviour"] = behaviour

    jobs = [job_work(job, shape, tokenizer) for job in study_jobs(config, shape)]
    captures = Work(tokens=n_models * sum(j["tokens"] for j in jobs), disk=n_models * sum(j["stored"] for j in jobs))
    captures.flops = n_models * sum(j["flops"] for j in jobs)
    captures.seconds = captures.flops / rates.flops
    # a job's outputs are all held until stored, beside the batch in flight
    captures.memory = resident + max([j["stored"] + j["active"] for j in jobs], default=0)
    stages["captures"] = captures

    probes = Work()
    for task in tasks:
        _, index = probe_inputs(task, config.probing.pooling, config.probing.max_length)
        n, width = len(index), index.shape[1] * shape.hidden
        probes.seconds += n_models * PROBE_SECONDS_PER_UNIT * (shape.layers + 1) * n * width * \
            len(config.probing.seeds) / 3
        probes.memory = max(probes.memory, 3 * (shape.layers + 1) * n * width * 4)
    stages["probes"] = probes

    similarity = Work()
    if config.similarity.weights:  # every model streamed once in chunks, a Gram row per pair
        from probing.similarity.weights import CHUNK_BYTES

        similarity.seconds += every_model / rates.io + n_models * (n_models + 1) * shape.params / rates.flops
        similarity.memory = 2 * CHUNK_BYTES
    windows = [j for j in jobs if j["patterns"]]
    if config.similarity.functional and windows:
        tokens = windows[0]["tokens"]
        pairs = n_models * (n_models - 1) / 2
        cka = 2 * tokens * shape.hidden ** 2 * (shape.layers + 1)
        similarity.seconds += (pairs + n_models) * cka / rates.flops
        # one layer's token states of every model, float32, and their centred copies
        similarity.memory = max(similarity.memory, 2 * n_models * tokens * shape.hidden * 4)
    stages["similarity"] = similarity

    stages["tables + report"] = Work(seconds=STARTUP_S + TABLES_S_PER_MODEL * n_models)

    total = Work()
    for work in stages.values():
        total.add(work)
    total.memory = rates.baseline + total.memory
    device = config.device if config.device != "auto" else f"auto ({_device(config)} here)"
    return {"config": config.name, "models": n_models, "merges": n_merges, "precision": config.precision,
            "device": device, "params": shape.params, "rates": rates, "stages": stages, "total": total,
            "hub_download": sum(sizes[spec.name] for spec in config.models
                                if not spec.source.startswith(EMBEDDED_PREFIX)
                                and not Path(spec.source).expanduser().is_dir())}


def _size(value: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def _time(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


def format_plan(result: dict) -> str:
    rates = result["rates"]
    lines = [f"plan for {result['config']}: {result['models']} models ({result['merges']} merges), "
             f"{result['params'] / 1e9:.2f}B parameters each, {result['precision']} on {result['device']}; "
             f"time at {rates.source}",
             f"{'stage':<22}{'time':>10}{'peak memory':>14}{'disk written':>14}{'tokens':>14}{'FLOPs':>12}"]
    rows = list(result["stages"].items()) + [("total", result["total"])]
    for name, work in rows:
        memory = _size(work.memory + (0 if name == "total" else rates.baseline)) if work.memory else "-"
        lines.append(f"{name:<22}{_time(work.seconds):>10}{memory:>14}{_size(work.disk) if work.disk else '-':>14}"
                     f"{f'{work.tokens:,}' if work.tokens else '-':>14}"
                     f"{f'{work.flops:.2e}' if work.flops else '-':>12}")
    if result["hub_download"]:
        lines.append(f"hub downloads into the Hugging Face cache (outside the run directory, unless cached): "
                     f"{_size(result['hub_download'])}")
    lines += [f"note: {note}" for note in result["total"].notes]
    return "\n".join(lines)


def format_comparison(result: dict, measured: dict) -> str:
    """The plan beside a finished run: each stage's planned and measured seconds (the run's cache ledger) and the
    measured forward tokens per second."""
    lines = [f"{'stage':<22}{'planned':>10}{'measured':>10}{'tokens/s':>12}"]
    for name, work in result["stages"].items():
        seconds = measured.get(name)
        rate = f"{work.tokens / seconds:,.0f}" if seconds and work.tokens else "-"
        lines.append(f"{name:<22}{_time(work.seconds):>10}{_time(seconds) if seconds else '-':>10}{rate:>12}")
    return "\n".join(lines)


# The cache ledger's stages (runstore.cache.record) under the plan's stage names.
LEDGER_STAGES = {"preflight": "parents + preflight", "merge": "merges", "behavior": "behaviour",
                 "captures": "captures", "probes": "probes", "weight_features": "similarity",
                 "functional_similarity": "similarity", "behavior_outcomes": "tables + report",
                 "internals_outcomes": "tables + report", "correlations": "tables + report",
                 "report": "tables + report"}


def measured_seconds(run_dir: Path) -> dict[str, float]:
    """Seconds per plan stage that the last run in `run_dir` recorded in its cache ledger."""
    from runstore.cache import read_ledger

    ledger = read_ledger(Path(run_dir) / "cache")
    last = ledger.filter(ledger["run"] == ledger["run"][-1]) if ledger.height else ledger
    out: dict[str, float] = {}
    for stage, seconds in zip(last["stage"], last["seconds"]):
        name = LEDGER_STAGES.get(stage, "tables + report")
        out[name] = out.get(name, 0.0) + seconds
    return out


def disk_estimate(config: ExperimentConfig) -> float:
    """Bytes the run writes under its directory: merged checkpoints and every model's captures (tables and other
    cache entries are small beside them), without tokenising or timing anything."""
    shape = model_shape(config, config_file(config, config.base))
    stored = sum(stored_bytes(job, shape) for job in study_jobs(config, shape))
    return len(config.merge_names) * shape.params * BYTES[config.precision] + len(config.model_names) * stored


def bytes_under(folder: Path) -> int:
    """Bytes of the files under `folder` (links not followed: a run folder links cached entries)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())


def disk_problems(config: ExperimentConfig, run_dir: Path) -> list[str]:
    """The run directory's filesystem must have FREE_MARGIN x the bytes still to write free: the planned bytes
    less what the run directory already holds (a re-run of a finished run writes nothing new, and a disk that
    filled up since must not refuse it). An unrelated folder counted as held is the user's choice of --run-dir;
    the refusal names every number, so the user can judge."""
    import shutil

    path = Path(run_dir).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    free, planned = shutil.disk_usage(existing).free, disk_estimate(config)
    if planned * FREE_MARGIN <= free:
        return []  # the common case: no need to walk a run folder of thousands of cache entries
    held = bytes_under(path) if path.is_dir() else 0
    if (planned - held) * FREE_MARGIN > free:
        return [f"run directory {str(run_dir)!r}: the run writes about {_size(planned)} (merged checkpoints and "
                f"captures; `merge-eval plan` shows each stage; {_size(held)} already there), more than the "
                f"{_size(free)} free on {existing} allows with a {FREE_MARGIN - 1:.0%} margin: free space or "
                "choose another --run-dir"]
    return []


def main(path: str | Path, device_rate: float | None = None, run_dir: Path | None = None) -> int:
    """Print the plan; with `run_dir` (a finished run of the same config), also each stage's measured time and
    tokens per second beside the plan's (scripts/gpu_check.sh)."""
    from flows import console

    console.install()  # lm-eval's task loaders speak to their own CLI's users (flows.console.NOISE)
    result = plan(load_config(path), device_rate)
    print(format_plan(result))
    if run_dir is not None:
        print(format_comparison(result, measured_seconds(run_dir)))
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="merge-eval plan, beside a finished run's measured stages")
    parser.add_argument("config", type=Path)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--device-rate", type=float, default=None)
    arguments = parser.parse_args()
    raise SystemExit(main(arguments.config, arguments.device_rate, arguments.run_dir))
