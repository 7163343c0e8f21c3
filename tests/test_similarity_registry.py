"""The feature registry is the contract: docs/FEATURES.md carries its index verbatim, and the weight-feature rows
a real run writes use only registered names, sources, levels and scopes, in the similarity schema."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from probing.similarity.registry import FEATURES, SIMILARITY_SCHEMA, feature_table
from probing.similarity.weights import weight_features

DOCS = Path(__file__).parents[1] / "docs" / "FEATURES.md"


def test_features_doc_carries_the_registry_index():
    text = DOCS.read_text()
    assert feature_table() in text, "docs/FEATURES.md is stale: paste `python -m probing.similarity.registry`"
    for name in FEATURES:
        assert text.count(f"`{name}`") >= 2, f"{name} is indexed but not defined in docs/FEATURES.md"


def test_weight_rows_follow_the_registry(tiny_family):
    rows = weight_features(dict(tiny_family), "base", groups={"a+b/x": ("a", "b")})
    assert dict(rows.schema) == SIMILARITY_SCHEMA
    assert rows["stat"].is_null().all() and rows["head"].is_null().all()
    for feature, scope, has_b in rows.select("feature", "scope", pl.col("model_b").is_not_null()).unique().rows():
        spec = FEATURES[feature]
        assert spec.source == "weights" and scope in spec.scopes
        assert has_b == (spec.level == "pair"), feature
