"""Shared fixtures: a tiny random Llama family for fast unit tests, the real embedded family for stage tests.

The environment is pinned before anything imports prefect or datasets: offline hub, and Prefect/HF homes inside
the pytest temp area so nothing leaks into the user's HOME.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

_SCRATCH = Path(tempfile.mkdtemp(prefix="merge-eval-tests-"))
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_HOME": str(_SCRATCH / "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HOME": str(_SCRATCH / "hf"),
})

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

TINY_TEXT = [
    "the cat sat on the mat", "the dogs run in the park", "a bird sings in a tree", "she reads a book",
    "Question: Ann has 3 apples and gets 4 more. Answer: 3 + 4 = 7.", "def f(x):\n    return x * 2",
    "Instruction: Repeat the word 'river' 2 times.\nResponse: river river", "12 + 7 = 19", "we walked home",
]


def make_tokenizer(folder: Path):
    """A small byte-level BPE tokenizer trained on TINY_TEXT (no hub, no GGUF), saved into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(TINY_TEXT, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def save_tiny(folder: Path, state: dict[str, torch.Tensor], tokenizer, config) -> Path:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_family(root: Path) -> dict[str, Path]:
    """Tiny Llama checkpoints sharing a base under `root`: `base`, and children `a`, `b` = base + their own random
    task vector (also the tiny family of bench/bench_task_runners.py).

    Small enough for exact checks in milliseconds; the children differ from the base in every tensor.
    """
    from transformers import LlamaForCausalLM

    tokenizer = make_tokenizer(root / "tokenizer")
    config = tiny_config(len(tokenizer))
    torch.manual_seed(0)
    base_state = {k: v.clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    paths = {"base": save_tiny(root / "base", base_state, tokenizer, config)}
    for seed, child in enumerate(["a", "b"], start=1):
        generator = torch.Generator().manual_seed(seed)
        state = {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in base_state.items()}
        paths[child] = save_tiny(root / child, state, tokenizer, config)
    return paths


NOUNS = [("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("girl", "girls"), ("boy", "boys"), ("park", "parks")]
VERBS = [("sits", "sit"), ("runs", "run"), ("sings", "sing")]
TINY_PARADIGMS = ("subject_verb_agreement", "determiner_noun_agreement")


def write_minimal_pairs(folder: Path, pairs: int = 12) -> Path:
    """A small minimal-pair folder in BLiMP's layout (two morphology paradigms of `pairs` pairs each), written the
    way a user's or the bundled suite's would be."""
    import json

    rows = {"subject_verb_agreement": [], "determiner_noun_agreement": []}
    for i in range(pairs):
        (one, many), (verb_one, verb_many) = NOUNS[i % len(NOUNS)], VERBS[i % len(VERBS)]
        plural = i % 2 == 1
        subject, good, bad = (many, verb_many, verb_one) if plural else (one, verb_one, verb_many)
        rows["subject_verb_agreement"].append((f"the {subject} {good} here.", f"the {subject} {bad} here."))
        det, noun, wrong = ("these", many, one) if plural else ("this", one, many)
        rows["determiner_noun_agreement"].append((f"she saw {det} {noun} {i}.", f"she saw {det} {wrong} {i}."))
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for uid, sentences in rows.items():
        lines = [json.dumps({"sentence_good": g, "sentence_bad": b, "field": "morphology", "linguistics_term": uid,
                             "UID": uid, "pairID": str(i), "lexically_identical": False})
                 for i, (g, b) in enumerate(sentences)]
        (folder / "data" / f"{uid}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


FIXTURES = Path(__file__).parent / "fixtures" / "holmes"
LENGTH_WORDS = "the cat sat on a warm mat by the old red door near our quiet home".split()


def probe_test_tasks(root: Path, holmes: tuple[str, ...] = ("pos",)) -> list:
    """Probing tasks of every kind for stage tests: the bundled suite's subject-verb agreement paradigm (its first
    20 pairs; sentence probe), the real-format Holmes fixtures named in `holmes`, and a regression task (sentence
    length in words, 24 sentences) written in Holmes's format under `root`."""
    from evaluation.minimal_pairs import PairSelection
    from probing.holmes import read_task, write_task
    from probing.minimal_pair_tasks import BUNDLED_DIR
    from probing.stage import load_tasks

    selection = PairSelection("suite", str(BUNDLED_DIR), ("subject_verb_agreement",), 20)
    items = [{"inputs": (" ".join(LENGTH_WORDS[i % 5:i % 5 + 3 + i % 9]),), "context": [], "label": 3 + i % 9,
              "split": ("train", "train", "dev", "test")[i % 4]} for i in range(24)]
    length = write_task(root / "sentence_length", "sentence_length", "syntax", "SENTENCE", [], items)
    return load_tasks(str(FIXTURES), list(holmes), (selection,)) + [read_task(length)]


def write_tiny_config(path: Path, family: dict[str, Path], **sections) -> Path:
    """A run config over the tiny family (one linear merge of a and b over base; small behaviour, probing and
    similarity workloads; the minimal pairs of `write_minimal_pairs`, written beside `path`), its top-level
    `sections` replaced by the caller's; written as YAML to `path`."""
    pairs = write_minimal_pairs(path.parent / "pairs")
    config = {
        "name": "tiny", "seed": 1, "precision": "float32", "device": "cpu",
        "models": [{"name": n, "source": str(p)} for n, p in family.items()], "base": "base",
        "merges": {"parents": [["a", "b"]], "methods": [{"method": "linear", "parameters": {"weight": 0.5}}]},
        "behavior": {"limit": 4, "batch_size": 4},
        "minimal_pairs": [{"source": str(pairs), "name": "tiny"}],
        "probing": {"seeds": [0], "batch_tokens": 512},
        "similarity": {"tokens": 512, "window": 32, "top_k": 64},
    } | sections
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_family(tmp_path_factory.mktemp("tiny-family"))


@pytest.fixture(scope="session")
def real_family() -> dict[str, Path]:
    """The real embedded family (SmolLM2-135M base + children), built once and cached by content."""
    from merging.family import build_family

    return build_family()


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for every flow-level test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):  # a busy 2-core machine
        yield


@pytest.fixture()
def load_counter(monkeypatch) -> Counter:
    """Counts `merging.checkpoints.load_model` calls per resolved folder, wherever a module bound it."""
    import merging.checkpoints

    original, loads = merging.checkpoints.load_model, Counter()

    def counting(folder, *args, **kwargs):
        loads[Path(folder).resolve()] += 1
        return original(folder, *args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "load_model", None) is original:
            monkeypatch.setattr(module, "load_model", counting)
    return loads
