"""Merge preflight: are these checkpoints compatible enough that merging them means something?

mergekit fails late (a shape error deep in a merge) or not at all (a vocabulary or tied-head mismatch silently
merges unrelated rows). Preflight reads only config.json, tokenizers and safetensors headers — plus, optionally,
one streamed pass for NaN/inf — and raises `PreflightError` with one line per mismatch naming the models, before
anything is written. A damaged folder (truncated safetensors, no tokenizer, another architecture's config) is
named file by file first, whatever its source (embedded cache, hub download, local copy). What mergekit copes
with (mixed dtypes, padded embedding rows) comes back as warnings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import merging.checkpoints
import merging.streaming
from merging.checkpoints import CheckpointError, checkpoint_problems, content_digest
from merging.family import TOKENIZER_PROBE
from merging.streaming import FLOAT_DTYPES, StreamedCheckpoint, row_chunks
from runstore.atomic import atomic_write_text
from runstore.cache import ALL_MODELS, cache_key, cached_value, code_version
from runstore.errors import UserError

TIED_HEAD = "lm_head.weight"  # absent from a checkpoint whose output head is its input embedding
_EMBEDDING_MARKERS = ("embed_tokens", "wte", "embed_in")
_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "float32": 32, "bfloat16": 16, "float16": 16}
_SHOWN = 3  # tensor names listed per problem before "... and N more"


class PreflightError(UserError):
    """Checkpoints that must not be merged together; `problems` holds one line per mismatch."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _listed(names: list[str]) -> str:
    more = f" ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def check_structure(checkpoints: dict[str, StreamedCheckpoint], reference: str, merging: bool = True) -> list[str]:
    """Same tensor names and shapes as `reference` (headers only); tied vs untied output heads named as such.
    `merging` off (comparing weights, not merging them): a model may also store tensors the reference lacks (its
    own output head, biases), and the reference's tensors are what is compared."""
    problems = []
    ref = checkpoints[reference]
    for name, checkpoint in checkpoints.items():
        if name == reference:
            continue
        if merging and (TIED_HEAD in ref.shapes) != (TIED_HEAD in checkpoint.shapes):
            untied, tied = (reference, name) if TIED_HEAD in ref.shapes else (name, reference)
            problems.append(f"embeddings: {tied!r} ties its output head to the input embedding (no {TIED_HEAD}) "
                            f"but {untied!r} has its own {TIED_HEAD}; merging them mixes a head with an embedding")
        missing = [t for t in ref.shapes if t not in checkpoint.shapes and t != TIED_HEAD]
        extra = [t for t in checkpoint.shapes if t not in ref.shapes and t != TIED_HEAD]
        if missing:
            problems.append(f"tensors: {name!r} lacks {len(missing)} tensor(s) of {reference!r}: {_listed(missing)}")
        if extra and merging:
            problems.append(f"tensors: {name!r} has {len(extra)} tensor(s) {reference!r} lacks: {_listed(extra)}")
        shapes = [f"{t} {list(checkpoint.shapes[t])} vs {list(s)}" for t, s in ref.shapes.items()
                  if t in checkpoint.shapes and checkpoint.shapes[t] != s]
        if shapes:
            problems.append(f"shapes: {name!r} differs from {reference!r} in {len(shapes)} tensor(s): "
                            f"{_listed(shapes)}")
    return problems


def _config(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}: cannot read config.json ({error})") from None


def check_configs(configs: dict[str, dict], reference: str) -> list[str]:
    """Same architecture class and model type as `reference` (tied heads are judged from the tensors)."""
    problems = []
    ref = configs[reference]
    for name, config in configs.items():
        for field in ("architectures", "model_type"):
            if name != reference and config.get(field) != ref.get(field):
                problems.append(f"config: {name!r} has {field}={config.get(field)!r} but {reference!r} has "
                                f"{ref.get(field)!r}")
    return problems


def check_dtypes(checkpoints: dict[str, StreamedCheckpoint], merge_dtype: str | None) -> tuple[list[str], list[str]]:
    """Floating-point weights only (a quantised checkpoint is an error); mixed or narrowed precision warns."""
    problems, warnings = [], []
    kinds = {}
    for name, checkpoint in checkpoints.items():
        kinds[name] = sorted(set(checkpoint.dtypes.values()))
        quantised = [t for t, d in checkpoint.dtypes.items() if d not in FLOAT_DTYPES]
        if quantised:
            problems.append(f"dtype: {name!r} has non-float tensors ({checkpoint.dtypes[quantised[0]]}: "
                            f"{_listed(quantised)}); merge unquantised weights")
    if len({tuple(k) for k in kinds.values()}) > 1:
        shown = ", ".join(f"{name}={'/'.join(k)}" for name, k in kinds.items())
        warnings.append(f"dtype: the models differ in precision ({shown}); mergekit casts all to the merge dtype")
    if merge_dtype:
        narrowed = [n for n, k in kinds.items() if max(_DTYPE_BITS.get(d, 0) for d in k) > _DTYPE_BITS[merge_dtype]]
        if narrowed:
            warnings.append(f"dtype: merging in {merge_dtype} rounds the weights of {', '.join(map(repr, narrowed))}")
    return problems, warnings


def _embedding_rows(checkpoint: StreamedCheckpoint) -> int | None:
    name = next((t for t in checkpoint.shapes if any(m in t for m in _EMBEDDING_MARKERS)), None)
    return checkpoint.shapes[name][0] if name else None


def check_tokenizers(models: dict[str, Path], checkpoints: dict[str, StreamedCheckpoint], reference: str,
                     probe_text: str) -> tuple[list[str], list[str]]:
    """Equal ids for a fixed probe text; embedding rows cover the tokenizer (padding rows only warn)."""
    from transformers import AutoTokenizer

    problems, warnings, ids = [], [], {}
    for name, folder in models.items():
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except Exception as error:  # noqa: BLE001 - tokenizer loaders raise many types; report, don't crash
            problems.append(f"tokenizer: cannot load the tokenizer of {name!r} from {folder}: {error}")
            continue
        ids[name] = tokenizer(probe_text, add_special_tokens=False)["input_ids"]
        size, rows = len(tokenizer), _embedding_rows(checkpoints[name])
        if rows is not None and rows < size:
            problems.append(f"vocabulary: {name!r} has {rows} embedding rows for a {size}-token tokenizer; "
                            f"token ids >= {rows} have no embedding")
        elif rows is not None and rows > size:
            warnings.append(f"vocabulary: {name!r} has {rows} embedding rows for a {size}-token tokenizer; the "
                            f"{rows - size} padding rows are merged like the others")
    if reference in ids:
        for name, probe_ids in ids.items():
            if probe_ids != ids[reference]:
                at = next((i for i, (a, b) in enumerate(zip(probe_ids, ids[reference])) if a != b),
                          min(len(probe_ids), len(ids[reference])))
                problems.append(f"tokenizer: {name!r} and {reference!r} encode the probe text differently "
                                f"({len(probe_ids)} vs {len(ids[reference])} tokens, first difference at token {at})")
    return problems, warnings


def check_values(checkpoints: dict[str, StreamedCheckpoint], max_elements: int = 1 << 22) -> list[str]:
    """NaN/inf anywhere in the weights, streamed tensor by tensor."""
    problems = []
    for name, checkpoint in checkpoints.items():
        bad = {}
        for tensor in checkpoint.names:
            count = 0
            for start, stop in row_chunks(checkpoint.shapes[tensor], max_elements):
                chunk = checkpoint.read(tensor, start, stop)
                if not torch.isfinite(chunk.sum(dtype=torch.float64)):  # one cheap pass; count only when needed
                    count += int((~torch.isfinite(chunk)).sum())
                checkpoint.release()
            if count:
                bad[tensor] = count
        if bad:
            problems.append(f"values: {name!r} has {sum(bad.values())} NaN/inf weight(s) in {len(bad)} tensor(s): "
                            f"{_listed(list(bad))}")
    return problems


def preflight(models: dict[str, Path], base: str | None = None, merge_dtype: str | None = None,
              scan_values: bool = True, probe_text: str = TOKENIZER_PROBE) -> list[str]:
    """Check that `models` (name -> checkpoint folder) can be merged; returns warnings, raises PreflightError."""
    reference = base if base in models else next(iter(models))
    damaged = [f"checkpoint: {name!r}: {problem}" for name, folder in models.items()
               for problem in checkpoint_problems(folder, allow_pickle=True)]  # pickle-only: StreamedCheckpoint says
    if damaged:
        raise PreflightError(damaged)
    checkpoints = {name: StreamedCheckpoint(folder) for name, folder in models.items()}
    try:
        problems = check_configs({name: _config(folder) for name, folder in models.items()}, reference)
        problems += check_structure(checkpoints, reference)
        dtype_problems, warnings = check_dtypes(checkpoints, merge_dtype)
        token_problems, token_warnings = check_tokenizers(models, checkpoints, reference, probe_text)
        problems += dtype_problems + token_problems
        warnings += token_warnings
        if scan_values and not problems:
            problems += check_values(checkpoints)
    finally:
        for checkpoint in checkpoints.values():
            checkpoint.close()
    if problems:
        raise PreflightError(problems)
    return warnings


def cached_preflight(models: dict[str, Path], base: str | None, merge_dtype: str | None,
                     cache_dir: Path) -> list[str]:
    """`preflight`'s warnings, remembered in `cache_dir/preflight` when it passed, by the checkpoints' contents,
    the settings and this code: the same parents are not scanned again on every run (the value scan streams every
    parent). A damaged folder is named before its content is digested; a failing check is never remembered."""
    damaged = [f"checkpoint: {name!r}: {problem}" for name, folder in models.items()
               for problem in checkpoint_problems(folder, allow_pickle=True)]
    if damaged:
        raise PreflightError(damaged)
    key = cache_key("preflight", code_version(__file__, merging.streaming.__file__, merging.checkpoints.__file__),
                    [[name, content_digest(folder, cache_dir)] for name, folder in models.items()], base, merge_dtype)
    entry = Path(cache_dir) / "preflight" / f"{key}.json"
    return cached_value(entry, "preflight", ALL_MODELS, lambda: preflight(models, base, merge_dtype),
                        lambda path: json.loads(path.read_text()),
                        lambda warnings, path: atomic_write_text(path, json.dumps(warnings)))[0]
