"""Every registered part of every kind, built-in or third-party, against its contract check.

One parametrised test over ``make_plugins().registries.all_parts()`` (zuko's tests/test_flows.py
pattern): each part is built with `flowkit.build` at a tiny size, in float64, initialised on data
where the kind has a data-dependent initialisation, perturbed with `randomize_` (zero-initialised
last layers would make couplings identities and conditional priors context-free, and a check of
a trivial part cannot fail), and handed to the `flowkit.testing` check of its kind at that
check's float64 tolerances. A third-party part that the size table below does not know is
built with its defaults. Context variants and the context rules of transforms are in
test_transform_contract.py.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import flowkit
from flowkit.plugins import make_plugins
from flowkit.testing import (
    check_dataset,
    check_decomposition,
    check_dequantizer,
    check_gradients,
    check_model,
    check_net,
    check_prior,
    check_transform,
    randomize_,
)

IN_SHAPE = (4, 4, 4)
IMAGE_SHAPE = (1, 8, 8)
TINY_NET = {"use": "glow_cnn", "hidden": 8}
TINY_GATED = {"use": "gated_resnet", "hidden": 8, "blocks": 1, "heads": 2, "dropout": 0.0}
TINY_GLOW = {"use": "glow", "coupling": {"use": "affine", "net": TINY_NET}}
# One-channel images cannot be split in channel halves: a checkerboard mask.
TINY_GLOW_CHECKERBOARD = {"use": "glow", "coupling": {"use": "affine", "mask": "checkerboard", "net": TINY_NET}}
# mixlogistic's bisection inverse is exact only to its tol (1e-6 by default): at 1e-12 the
# float64 checks (atol 1e-10, rtol 1e-8) apply to it as to every other part.
TINY_MIXLOGISTIC = {"use": "mixlogistic", "components": 2, "tol": 1e-12, "net": TINY_GATED}
TINY_REALNVP_NET = {"use": "realnvp_resnet", "hidden": 8, "blocks": 1}

#: Params overrides per built-in part, where its defaults are too big for a contract check.
SMALL: dict[tuple[str, str], dict[str, Any]] = {
    ("coupling", "additive"): {"net": TINY_NET},
    ("coupling", "affine"): {"net": TINY_NET},
    ("coupling", "example_shift"): {"scale": True, "net": TINY_NET},
    ("coupling", "mixlogistic"): {k: v for k, v in TINY_MIXLOGISTIC.items() if k != "use"},
    ("step", "glow"): {"coupling": TINY_GLOW["coupling"]},
    ("step", "macow"): {"units": 1, "glow": TINY_GLOW},
    ("step", "flowpp"): {"coupling": TINY_MIXLOGISTIC, "noise": 0.3},
    ("net", "wavelet_flow_resnet"): {"hidden": 8, "blocks": 1},
    ("net", "glow_cnn"): {"hidden": 8},
    ("net", "gated_resnet"): {k: v for k, v in TINY_GATED.items() if k != "use"},
    ("dequantizer", "variational"): {"steps": 2, "step": TINY_GLOW_CHECKERBOARD, "context_channels": 4, "context_blocks": 1,
                                     "dropout": 0.0},
    ("model", "multiscale"): {"levels": 2, "depth": 2, "step": TINY_GLOW},
    # crops: the top level trains on random 2x2 windows, from its own generator (checked in training mode)
    ("model", "wavelet_flow"): {"levels": 2, "depth": [2], "hidden": [8], "cond_channels": 4, "cond_depth": 1,
                                "crops": [1, 1, 2],
                                # its hidden sets the nets' width (a width in the step would be refused)
                                "base_step": {"use": "glow", "coupling": {"use": "affine", "mask": "checkerboard"}}},
    ("model", "flowpp"): {"layout": ["checkerboard", "squeeze", "channel"],
                          "step": {"use": "glow", "coupling": TINY_MIXLOGISTIC}},
    ("net", "realnvp_resnet"): {"hidden": 8, "blocks": 1},
    ("step", "realnvp"): {"coupling": {"net": TINY_REALNVP_NET}},
    # 1x8x8: checkerboard steps, squeeze to 4x4x4, channel steps, factor out 2 of 4, 4 checkerboard steps.
    ("model", "realnvp"): {"hidden": 4, "checkerboard_step": {"coupling": {"net": {"blocks": 1}}},
                           "channel_step": {"coupling": {"net": {"blocks": 1}}}},
    ("net", "causal_transformer"): {"width": 16, "depth": 2, "head_dim": 8},
    ("net", "vit"): {"width": 16, "depth": 1, "heads": 2, "patch": 2},
    ("step", "tarflow"): {"order": "flip", "net": {"use": "causal_transformer", "width": 16, "depth": 1, "head_dim": 8}},
    # The spatial split: a channel coupling would be checked by the coupling's own contract.
    ("step", "jet"): {"projection": "checkerboard", "coupling": {"net": {"use": "vit", "width": 16, "depth": 1,
                                                                         "heads": 2}}},
    # 1x8x8 at patch 2: 16 tokens of 4 features; patch 4 would leave 4.
    ("model", "tarflow"): {"blocks": 2, "patchify": {"use": "patchify", "patch": 2},
                           "step": {"net": {"width": 16, "depth": 1, "head_dim": 8}}},
    ("model", "jet"): {"depth": 3, "patchify": {"use": "patchify", "patch": 2, "order": "space_to_depth"},
                       "step": {"coupling": {"net": {"width": 16, "depth": 1, "heads": 2}}}},
}


def _cases() -> list:
    return [pytest.param(part.kind, part.name, id=f"{part.kind}:{part.name}")
            for part in make_plugins().registries.all_parts()]


@pytest.fixture(scope="module")
def plugins():
    return make_plugins()


def _build(plugins, kind: str, name: str, **shape: Any) -> Any:
    return flowkit.build(kind, name, plugins=plugins, **shape, **SMALL.get((kind, name), {}))


def _images(batch: int, shape: tuple[int, ...] = IMAGE_SHAPE) -> torch.Tensor:
    """Images in (0, 1): uniformly dequantized 5-bit values, as a model sees them."""
    x = torch.randint(0, 32, (batch, *shape)).double()
    return (x + torch.rand_like(x)) / 32


def _transform(plugins, kind: str, name: str) -> None:
    part = _build(plugins, kind, name, in_shape=IN_SHAPE).double()
    x = 2.0 * torch.randn(2, *IN_SHAPE, dtype=torch.float64) + 0.5
    randomize_(part)
    part.initialize(x)
    part.eval()  # dropout would make forward and inverse draw different masks
    check_transform(part, x)
    z, logabsdet = part(x)
    assert not torch.allclose(z, x), f"{kind}:{name} is the identity after randomize_: the checks could not fail"
    check_gradients(part, -(logabsdet - 0.5 * z.square().flatten(1).sum(1)).mean())


def _decomposition(plugins, kind: str, name: str) -> None:
    check_decomposition(_build(plugins, kind, name).double(), torch.randn(2, 2, 4, 4, dtype=torch.float64))


def _net(plugins, kind: str, name: str) -> None:
    for context_shape in (None, (3, 4, 4), (3,)):  # no context, a spatial one, a vector
        net = _build(plugins, kind, name, in_shape=(2, 4, 4), context_shape=context_shape, out_channels=5).double()
        x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
        context = None if context_shape is None else torch.randn(3, *context_shape, dtype=torch.float64)
        randomize_(net)
        check_net(net, x, context, out_channels=5)


def _prior(plugins, kind: str, name: str) -> None:
    shape = (2, 4, 4)
    # A spatial context and a vector one for the conditional ones; an unconditional prior ignores
    # the shape it is given.
    for context_shape in ((3, 4, 4), (3,)):
        prior = _build(plugins, kind, name, in_shape=shape, context_shape=context_shape).double()
        context = None if prior.context_shape is None else torch.randn(3, *prior.context_shape, dtype=torch.float64)
        randomize_(prior, 0.3)
        # The built-in priors are diagonal Gaussians: require it, so a failed detection is an error.
        check_prior(prior, context, diagonal_gaussian=True if part_is_builtin(plugins, kind, name) else None)


def part_is_builtin(plugins, kind: str, name: str) -> bool:
    return plugins.registries.part(kind, name).distribution == "flowkit"


def _dequantizer(plugins, kind: str, name: str) -> None:
    shape = (1, 2, 2)  # D = 4: small enough for the Monte Carlo check of log q's normalisation
    n_bits = 3
    dequantizer = _build(plugins, kind, name, in_shape=shape).double()
    x = torch.randint(0, 2**n_bits, (4, *shape)).double()
    x[0] = 0
    x[1] = 2**n_bits - 1  # the top bin, where y < 1 is hardest
    dequantizer.initialize(x, n_bits)
    randomize_(dequantizer)
    check_dequantizer(dequantizer, x, n_bits)


def _model(plugins, kind: str, name: str) -> None:
    model = _build(plugins, kind, name, in_shape=IMAGE_SHAPE).double()
    y = _images(4)
    model.initialize(_images(16))
    randomize_(model, 0.05)
    check_model(model, y)
    if plugins.registries.part(kind, name).accepts("vector"):
        _conditioned_model(plugins, kind, name, y)


def _conditioned_model(plugins, kind: str, name: str, y: torch.Tensor) -> None:
    """A model that declares a vector context, built with a class one-hot of 3 classes + no class:
    its terms take the context, every parameter gets a gradient, and the class reaches the density."""
    from flowkit.models import ClassConditioned

    model = _build(plugins, kind, name, in_shape=IMAGE_SHAPE, context_shape=(4,)).double()
    cond = ClassConditioned(model, 3)
    labels = torch.tensor([0, 1, 2, 3])
    model.initialize(_images(16), cond.one_hot(torch.arange(16) % 4, y))
    randomize_(model, 0.05)
    model.eval()
    parts = model.log_prob_parts(y, cond.one_hot(labels, y))
    assert list(parts) == list(model.part_dims()) and all(t.shape == (4,) for t in parts.values())
    per_class = cond.log_prob_per_class(y)
    assert torch.isfinite(per_class).all() and (per_class.max(1).values - per_class.min(1).values > 1e-9).all(), \
        f"{kind}:{name} built with a class context gives every class the same density: the context is not used"
    model.train()
    check_gradients(model, -cond.log_prob(y, labels).mean())
    model.eval()
    assert cond.sample(2, 0.5, 1).shape == (2, *IMAGE_SHAPE)


def _dataset(plugins, kind: str, name: str, tmp_path: Path) -> None:
    params = {"limit_train": 3, "limit_test": 2}
    if name == "npz":
        params["path"] = str(_npz(tmp_path))
    elif name == "image_folder":
        params["path"] = str(_png_folder(tmp_path))
    elif name == "cifar10":
        params["path"] = str(_cifar_folder(tmp_path))
    elif name == "store":
        params["path"] = str(_store(tmp_path))
    elif not part_is_builtin(plugins, kind, name):
        pytest.skip(f"dataset:{name} is a third-party dataset whose files this test cannot provide")
    dataset = flowkit.build(kind, name, plugins=plugins, **params)
    ref = flowkit.ref(kind, name, plugins=plugins, **params)
    check_dataset(dataset, ref.params)


def _npz(root: Path) -> Path:
    rng = np.random.default_rng(0)
    path = root / "tiny.npz"
    np.savez(path, x_train=rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8),
             x_test=rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8))
    return path


def _png_folder(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for split, count in (("train", 4), ("test", 3)):
        (root / "pngs" / split).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(root / "pngs" / split / f"{i}.png")
    return root / "pngs"


def _cifar_folder(root: Path) -> Path:
    """The official cifar-10-batches-py layout with two images per batch file."""
    from flowkit_plugins.datasets.cifar10 import TEST_FILE, TRAIN_FILES

    rng = np.random.default_rng(2)
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for name in (*TRAIN_FILES, TEST_FILE):
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [0, 1]}
        with (folder / name).open("wb") as handle:
            pickle.dump(batch, handle, protocol=4)
    return folder


def _store(root: Path) -> Path:
    """A labelled store prepared from a tiny npz, as `flowkit data prepare --labels` makes it."""
    from flowkit_plugins.datasets._prepare import Options, open_source, prepare

    rng = np.random.default_rng(3)
    np.savez(root / "labelled.npz", x_train=rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8), y_train=[0, 1, 2, 1, 0],
             x_test=rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8), y_test=[2, 2, 1, 0])
    prepare(open_source(root / "labelled.npz", "auto", Options(labels=True, chunk_images=2)), root / "store")
    return root / "store"


CHECKS = {
    "transform": _transform, "coupling": _transform, "step": _transform, "decomposition": _decomposition,
    "net": _net, "prior": _prior, "dequantizer": _dequantizer, "model": _model,
}


@pytest.mark.parametrize("kind, name", _cases())
def test_part_honours_its_contract(plugins, kind: str, name: str, tmp_path: Path) -> None:
    if kind == "dataset":
        _dataset(plugins, kind, name, tmp_path)
        return
    assert kind in CHECKS, f"kind {kind!r} has no contract check: add one to flowkit.testing and to CHECKS"
    CHECKS[kind](plugins, kind, name)


def test_every_kind_has_a_check() -> None:
    from flowkit.kinds import KINDS

    assert set(KINDS) == set(CHECKS) | {"dataset"}
