"""lm-eval `custom_dataset` for the offline suite: reads a bundled jsonl beside this file.

A custom loader (not `dataset_path: json`) because lm-eval resolves `data_files` against the working directory,
not the YAML's folder, and `datasets.load_dataset` writes a cache under HF_HOME; this needs neither.
"""

import json
from pathlib import Path

import datasets

DATA = Path(__file__).parent / "data"


def load(file: str, **_: object) -> dict[str, datasets.Dataset]:
    rows = [json.loads(line) for line in (DATA / Path(file).name).read_text().splitlines()]
    return {"test": datasets.Dataset.from_list(rows)}
