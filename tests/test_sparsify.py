"""Our topk magnitude sparsification equals mergekit's argsort one (its own function as the reference)."""

from __future__ import annotations

import pytest
import torch
from mergekit.sparsify import RescaleNorm

from merging.sparsify import magnitude, mergekit_magnitude


@pytest.mark.parametrize("density", [0.0, 1e-6, 0.1, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("norm", [None, RescaleNorm.l1, RescaleNorm.l2])
def test_topk_magnitude_equals_mergekit(density, norm):
    tensor = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))  # distinct magnitudes: no ties
    torch.testing.assert_close(magnitude(tensor, density, norm), mergekit_magnitude()(tensor, density, norm),
                               rtol=0, atol=0)


def test_ties_merge_uses_it_and_equals_mergekits_own(tiny_family, tmp_path, monkeypatch):
    import mergekit.sparsify

    from merging import sparsify
    from merging.family import load_state_dict
    from merging.merge import MergeLineage, merge

    lineage = MergeLineage("t", "ties", ("a", "b"), "base", {"weight": 1.0, "density": 0.3})
    merge(lineage, tiny_family, tmp_path / "ours")
    assert mergekit.sparsify.magnitude is magnitude
    monkeypatch.setattr(sparsify, "install", lambda: None)  # the reference merge: mergekit's own argsort
    monkeypatch.setattr(mergekit.sparsify, "magnitude", mergekit_magnitude())
    merge(lineage, tiny_family, tmp_path / "theirs")
    ours, theirs = load_state_dict(tmp_path / "ours"), load_state_dict(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)
