"""recipes/ablations/cross_breeds.toml compares what its header says it compares."""

from __future__ import annotations

from pathlib import Path

from flowkit.runs.ablation.spec import load_ablation

ROOT = Path(__file__).resolve().parents[2]
PATH = ROOT / "recipes" / "ablations" / "cross_breeds.toml"


def _by_variant(plugins, preset=None):
    return {run.variant: run.recipe for run in load_ablation(PATH, plugins.registries, preset=preset).runs}


def test_variational_arms_use_flowpps_dequantizer_and_one_level_thread(plugins):
    recipes = _by_variant(plugins)
    flowpp = recipes["flowpp"].dequantizer
    for name in ("wf_variational_affine", "wf_variational_mixlogistic"):
        # A learned dequantizer feeds every level: the level threads are refused with it.
        assert recipes[name].dequantizer == flowpp, name
        assert recipes[name].train.level_threads == 1, name
    for name in ("wf_uniform_affine", "wf_uniform_mixlogistic"):
        assert recipes[name].dequantizer.use == "uniform" and recipes[name].train.level_threads == 2, name


def test_every_variant_is_evaluated_on_the_whole_test_set_with_three_seeds(plugins):
    runs = load_ablation(PATH, plugins.registries).runs
    assert {r.recipe.data.params.limit_test for r in runs} == {0}
    assert sorted({r.seed for r in runs}) == [0, 1, 2] and len(runs) == 15


def test_steps_preset_gives_every_variant_the_same_steps(plugins):
    recipes = _by_variant(plugins, "steps")
    assert {(r.train.steps, r.train.minutes) for r in recipes.values()} == {(1500, 0.0)}
