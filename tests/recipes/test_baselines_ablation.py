"""recipes/ablations/baselines.toml compares the five baselines as its header says: each at its own
CPU default, the whole test set, three seeds, and one budget for all (the `short` preset too)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowkit.runs.ablation.spec import load_ablation

PATH = Path(__file__).resolve().parents[2] / "recipes" / "ablations" / "baselines.toml"
MODELS = {"wavelet_flow", "glow", "flowpp", "tarflow", "jet"}


@pytest.mark.parametrize(("preset", "minutes"), [(None, 8.0), ("short", 4.0)])
def test_five_models_three_seeds_one_budget_whole_test_set(plugins, preset, minutes):
    runs = load_ablation(PATH, plugins.registries, preset=preset).runs
    assert {r.variant for r in runs} == MODELS
    assert sorted((r.variant, r.seed) for r in runs) == sorted((m, s) for m in MODELS for s in (0, 1, 2))
    assert {(r.recipe.train.minutes, r.recipe.train.steps) for r in runs} == {(minutes, 0)}
    assert {r.recipe.data.params.limit_test for r in runs} == {0}


def test_transformer_flows_are_compared_on_uniform_noise(plugins):
    # A Gaussian-noise run has no bits/dim of the images: it may not enter a bits/dim comparison.
    runs = load_ablation(PATH, plugins.registries, preset="short").runs
    assert {r.recipe.dequantizer.use for r in runs if r.variant in {"tarflow", "jet"}} == {"uniform"}
