"""Property-based fuzz of the config loader (hypothesis): whatever a user writes into a config file, `merge-eval
validate` exits 0, or exits 2 with one `error:` line per problem naming the file; never a traceback.

Three sources of input: arbitrary text, random YAML documents built from the config's own vocabulary (so that
validation gets past the top level), and random mutations of the shipped configs (so that it gets everywhere).
Bounded example counts keep the whole file near 20 s on 2 cores.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.cli import main

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {name: yaml.safe_load((ROOT / "configs" / name).read_text()) for name in ("smollm2.yaml", "qwen.yaml")}
VOCABULARY = ["name", "description", "seed", "precision", "device", "trust_remote_code", "allow_pickle", "models",
              "base", "source", "revision", "merges", "parents", "methods", "method", "label", "parameters",
              "weight", "density", "t", "behavior", "suites", "batch_size", "limit", "probing", "data", "tasks",
              "batch_tokens", "seeds", "max_length", "controls", "mdl", "pooling", "similarity", "weights"]
INTERESTING = ["embedded:base", "embedded:math", "embedded:nothing", "embedded:", "base", "math", "instruct",
               "linear", "slerp", "ties", "dare_ties", "offline", "leaderboard", "bundled", "cuda", "cpu", "auto",
               "bfloat16", "float32", "int4", "Qwen/Qwen2.5-7B", "owner/name/extra", ".", "..", "", "tense",
               "a" * 200, "ünïcode", "-1", "1e309", "nan"]
# Path-like text stays inside the example's own folder: no "/" or "~" alone ("/" would make probing.data walk
# the whole filesystem, which is what the user asked for but not what a test should do).
TEXT = st.text(st.characters(blacklist_characters="/~\\", blacklist_categories=("Cs",)), max_size=12)
SCALARS = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
           | st.sampled_from(INTERESTING) | TEXT)
KEYS = st.sampled_from(VOCABULARY) | TEXT
DOCUMENTS = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(KEYS, inner, max_size=6), max_leaves=30)
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def workdir():
    """A nested scratch folder as the working directory, so that relative paths ('.', '..') stay inside it."""
    with tempfile.TemporaryDirectory(prefix="config-fuzz-") as root:
        here = Path(root) / "a" / "b"
        here.mkdir(parents=True)
        old = Path.cwd()
        os.chdir(here)
        try:
            yield here
        finally:
            os.chdir(old)


def check_validate(path: Path, capsys) -> None:
    code = main(["validate", str(path)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    if code == 0:
        assert lines == [] and out.startswith(f"{path}: ok")
    else:
        assert code == 2 and lines, "exit 2 must say why"
        assert all(line.startswith(f"error: {path}") for line in lines), lines


@FUZZ
@given(text=st.text(max_size=300))
def test_any_text(workdir, capsys, text):
    path = workdir / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check_validate(path, capsys)


@FUZZ
@given(document=DOCUMENTS)
def test_random_yaml_documents(workdir, capsys, document):
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    check_validate(path, capsys)


def _paths(node, prefix=()):
    """Every place in a document: key paths into dicts and index paths into lists."""
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, prefix + (key,))


def _parent(document, path):
    for part in path[:-1]:
        document = document[part]
    return document


@st.composite
def mutated_configs(draw):
    """A shipped config with 1-4 edits: a value replaced, a key or item removed, an unknown key added."""
    import copy

    document = copy.deepcopy(SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))])
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(list(_paths(document))))
        if not path:
            continue
        parent, last = _parent(document, path), path[-1]
        action = draw(st.sampled_from(["replace", "remove", "add", "copy"]))
        if action == "replace":
            parent[last] = draw(DOCUMENTS)
        elif action == "remove":
            del parent[last]
        elif action == "add" and isinstance(parent[last], dict):
            parent[last][draw(KEYS)] = draw(DOCUMENTS)
        elif action == "copy" and isinstance(parent[last], list) and parent[last]:
            parent[last].append(copy.deepcopy(parent[last][0]))
    return document


@FUZZ
@given(document=mutated_configs())
def test_mutated_shipped_configs(workdir, capsys, document):
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True, sort_keys=False))
    check_validate(path, capsys)
