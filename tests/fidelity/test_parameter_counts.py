"""Every `paper` preset has the parameter count of its reference code, within 0.5%.

The references were counted from the released code's layer shapes (docs/baselines/fidelity.md
shows the sums); each constant names its file. A preset that drifts from its reference (a
missing edge-padding channel, the wrong coupling net, a width rule) moves its count and fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowkit.api import default_plugins
from flowkit.build import Builder
from flowkit.contracts.decomposition import DecompositionLayer
from flowkit.recipes.load import load_recipe
from flowkit.runs.inspect import inspect

# YorkUCVIL/Wavelet-Flow @8d6d63f, src/data/imagenet_64_haar/config.hjson (l.15-42) with the layers
# of src/tf_components/bijector/{Coupling,Act_norm,Invertible_1x1}.py and Single_scale_flow.py.
WAVELET_FLOW_IMAGENET64 = 96_139_794
# openai/glow, README.md l.72 (CIFAR-10, --n_level 3 --depth 32 --learntop, width 512): model.py and
# tfops.py with edge_bias (467,748 of them in the edge channels; 83,136 in learntop's conv of zeros).
GLOW_CIFAR10 = 44_603_604
# aravindsrinivas/flowpp @737fadb, flows/run_cifar.py l.1-6 (the docstring: "Params: 31,443,440").
FLOWPP_CIFAR10 = 31_443_440
# XuezheMax/macow, experiments/configs/cifar10-vdq.json: 37,197,547 in the flow and 1,205,876 in
# the dequantizer (macow/flows/{macow,glow,conv,nice}.py, macow/flows/dequant.py).
MACOW_CIFAR10 = 37_197_547 + 1_205_876
# tensorflow/models research/real_nvp (real_nvp_multiscale_dataset.py, real_nvp_utils.py) with the paper's
# CIFAR-10 settings (n_scale = 2, base_dim = 64, residual_blocks = 8): the trainable variables, summed from
# their shapes in docs/baselines/fidelity.md; 18,547 of them are batch-norm betas.
REALNVP_CIFAR10 = 19_609_545
REALNVP_BATCH_NORM_BETAS = 18_547

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

CASES = [
    ("wavelet_flow_affine", (3, 64, 64), WAVELET_FLOW_IMAGENET64),
    ("glow", (3, 32, 32), GLOW_CIFAR10),
    ("flowpp", (3, 32, 32), FLOWPP_CIFAR10),
    ("macow", (3, 32, 32), MACOW_CIFAR10),
    ("realnvp", (3, 32, 32), REALNVP_CIFAR10),
]


@pytest.mark.parametrize(("recipe", "shape", "reference"), CASES, ids=[c[0] for c in CASES])
def test_paper_preset_has_the_reference_parameter_count(recipe: str, shape: tuple[int, int, int],
                                                        reference: int) -> None:
    plugins = default_plugins()
    resolved = load_recipe(RECIPES / f"{recipe}.toml", plugins.registries, preset="paper")
    torch.manual_seed(0)
    counted = inspect(resolved, plugins, shape=shape, memory=False).params
    gap = (counted - reference) / reference
    assert abs(gap) <= 0.005, f"{recipe} --preset paper: {counted:,} parameters, the reference {reference:,} ({gap:+.2%})"


def test_the_wavelet_flow_preset_is_exactly_the_reference() -> None:
    """Wavelet Flow's count is not only close but equal: every layer is the reference's."""
    plugins = default_plugins()
    resolved = load_recipe(RECIPES / "wavelet_flow_affine.toml", plugins.registries, preset="paper")
    assert inspect(resolved, plugins, shape=(3, 64, 64), memory=False).params == WAVELET_FLOW_IMAGENET64


def test_the_flowpp_preset_is_exactly_the_reference() -> None:
    """Flow++'s count is equal too: the flow layer for layer, and the dequantizer's context encoder
    on the column halves side by side at half width (context_layout = "columns"), as
    run_cifar.py's shallow_processor; on the whole image it had 48,288 parameters more."""
    plugins = default_plugins()
    resolved = load_recipe(RECIPES / "flowpp.toml", plugins.registries, preset="paper")
    assert inspect(resolved, plugins, shape=(3, 32, 32), memory=False).params == FLOWPP_CIFAR10
    whole_image = load_recipe(RECIPES / "flowpp.toml", plugins.registries, preset="paper",
                              overrides=('dequantizer.context_layout="image"',))
    assert inspect(whole_image, plugins, shape=(3, 32, 32), memory=False).params == FLOWPP_CIFAR10 + 48_288


def test_the_flowpp_preset_splits_and_squeezes_as_the_released_code() -> None:
    """Not visible in the count: the halves (even and odd columns, CheckerboardSplit) and the
    squeeze's channel order (tf.space_to_depth) decide what each coupling conditions on."""
    plugins = default_plugins()
    resolved = load_recipe(RECIPES / "flowpp.toml", plugins.registries, preset="paper")
    model = Builder(plugins.registries)(resolved.model, in_shape=(3, 32, 32))
    squeezes = [m.decomposition for m in model.modules() if isinstance(m, DecompositionLayer)]
    masks = [m.mask_kind for m in model.modules() if type(m).__name__ == "MixLogisticCoupling"]
    assert [s.order for s in squeezes] == ["space_to_depth"]
    assert masks == ["columns"] * 4 + ["channel"] * 2 + ["columns"] * 3


def test_the_macow_flow_is_exactly_the_reference() -> None:
    """The flow layer for layer (weight-normalised masked convolutions and NICE nets, NICE's
    C - C // 2 conditioning channels, N(0, I) at the top); the dequantizer is flowkit's own."""
    plugins = default_plugins()
    resolved = load_recipe(RECIPES / "macow.toml", plugins.registries, preset="paper")
    model = Builder(plugins.registries)(resolved.model, in_shape=(3, 32, 32))
    assert sum(p.numel() for p in model.parameters()) == 37_197_547


def test_the_realnvp_preset_differs_from_the_reference_only_by_its_normalisations() -> None:
    """Layer for layer the reference's, but each batch norm (one beta per channel; no gamma) is an
    actnorm (bias and log-scale), and each coupling's output batch norm (no trainable variable)
    an actnorm over the coupling's channels: 3 x 3, 3 x 12 and 4 x 6 channels, two parameters each."""
    plugins = default_plugins()
    resolved = load_recipe(RECIPES / "realnvp.toml", plugins.registries, preset="paper")
    output_actnorms = 2 * (3 * 3 + 3 * 12 + 4 * 6)
    counted = inspect(resolved, plugins, shape=(3, 32, 32), memory=False).params
    assert counted == REALNVP_CIFAR10 + REALNVP_BATCH_NORM_BETAS + output_actnorms == 19_628_230


# apple/ml-tarflow @313120e, README.md "Unconditional ImageNet64 density modelling": transformer_flow.Model(
# in_channels=3, img_size=64, patch_size=2, channels=768, num_blocks=8, layers_per_block=8), its parameters
# counted by instantiating the reference's own PyTorch module (docs/baselines/fidelity.md).
TARFLOW_IMAGENET64 = 460_142_784
# The same Model at train_local.ipynb's MNIST settings (patch 4, 128 channels, 4 blocks of 4 layers),
# unconditional (num_classes = 0): the CPU default's architecture.
TARFLOW_MNIST = 3_222_656
# google-research/big_vision @0127fb6, configs/proj/jet/imagenet64.py (depth 32, block depth 2, emb_dim 512,
# 8 heads, patch 4) with models/proj/jet/jet.py and models/vit.py: the trainable parameters derived from the
# flax modules' shapes in docs/baselines/fidelity.md (the parameter tree also holds 2,170,880 entries of
# frozen projection matrices, buffers here).
JET_IMAGENET64 = 207_177_216
JET_FROZEN_PROJECTIONS = 32 * 48 * 48 + 32 * 256 * 256


def _count_on_meta(recipe: str, preset: str | None, shape: tuple[int, int, int]) -> tuple[int, torch.nn.Module]:
    """The model of a recipe built on the meta device: shapes without memory (460M parameters)."""
    plugins = default_plugins()
    resolved = load_recipe(RECIPES / f"{recipe}.toml", plugins.registries, preset=preset)
    with torch.device("meta"):
        model = Builder(plugins.registries)(resolved.model, in_shape=shape)
    return sum(p.numel() for p in model.parameters()), model


@pytest.mark.parametrize(("recipe", "preset", "shape", "reference"), [
    ("tarflow", "paper", (3, 64, 64), TARFLOW_IMAGENET64),
    ("tarflow", None, (1, 28, 28), TARFLOW_MNIST),
    ("jet", "paper", (3, 64, 64), JET_IMAGENET64),
], ids=["tarflow-paper", "tarflow-default", "jet-paper"])
def test_the_transformer_flows_are_exactly_the_reference(recipe: str, preset: str | None,
                                                         shape: tuple[int, int, int], reference: int) -> None:
    """Layer for layer: TarFlow's MetaBlocks (proj_in, pos_embed, attention blocks, proj_out) and Jet's
    couplings (init_proj, posemb, ViT encoder, final_proj); the counts are equal, not only close."""
    counted, _ = _count_on_meta(recipe, preset, shape)
    assert counted == reference


def test_jets_frozen_projections_are_buffers_of_the_references_sizes() -> None:
    """The reference keeps its projections as 0/1 matrices among its parameters (frozen by the
    schedule): (32, 48, 48) and (32, 256, 256). flowkit keeps each as an index buffer."""
    counted, model = _count_on_meta("jet", "paper", (3, 64, 64))
    steps = [m for m in model.modules() if type(m).__name__ == "JetStep"]
    assert len(steps) == 32 and all(s.index.numel() == 48 * 256 for s in steps)
    assert counted + JET_FROZEN_PROJECTIONS == 209_348_096
    assert [s.projection for s in steps if s.projection != "random"] == [
        "checkerboard", "checkerboard-inv", "vstripes", "vstripes-inv", "hstripes", "hstripes-inv"]
