"""Contract checks of density models (with their capabilities) and datasets."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flowkit.contracts.dataset import ImageDataset
from flowkit.contracts.model import DensityModel, IndependentTerms, LatentVariable, SuperResolution
from flowkit.testing._common import SIGMAS, check_gradients, check_rows_independent, _close, default_tolerances, _unchanged


def check_model(
    model: DensityModel, y: Tensor, *, n_samples: int = 2, atol: float | None = None, rtol: float | None = None,
) -> None:
    """A density model on images ``y`` (B >= 2, values in [0, 1)); see `flowkit.contracts.model`.

    - ``log_prob_parts(y)``: ``(B,)`` finite terms whose names are those of ``part_dims()``,
      whose dimensions are positive and add up to D = C·H·W; ``log_prob(y)`` is their sum, in
      at least float32; rows are independent.
    - ``parameter_groups()``: disjoint groups covering every trainable parameter (the optimiser
      sees only these); every one of them gets a finite gradient from ``-log_prob``.
    - ``sample(n, T)`` is ``(n, C, H, W)`` in y's dtype, and deterministic at ``T = 0``.
    - `IndependentTerms`: groups named like the terms; ``log_prob_terms(y, [t])`` returns
      exactly ``{t: log_prob_parts(y)[t]}``; each term's gradient reaches its own group and
      no other; computing a term leaves the global random state alone (training mode too).
    - `SuperResolution`: ``superres(reduce(y, levels), levels)`` and
      ``low_to_image(reduce(y, levels), levels)`` give back ``y``; an image sampled from
      ``reduce(y, j)`` reduces to it again.
    - `LatentVariable`: the terms are a one-draw bound, so every comparison above calls the
      model from the same random state; the ``kl`` term may factor out 0 dimensions;
      ``log_joint_sample`` is ``(B,)``, finite, repeatable from one random state, and its mean
      over draws equals the mean of ``log_prob`` (both estimate the ELBO) within `SIGMAS`
      standard errors.

    Everything but the gradients runs in eval mode (dropout off); the mode is restored. Call
    ``initialize`` and `randomize_` first.
    """
    atol, rtol = default_tolerances(y.dtype, atol, rtol)
    batch = y.shape[0]
    c, h, w = (int(s) for s in model.in_shape)
    assert tuple(y.shape[1:]) == (c, h, w), f"y has shape {tuple(y.shape)}, but the model's in_shape is {(c, h, w)}"
    was_training = model.training
    model.eval()
    try:
        _check_model_eval(model, y, batch, (c, h, w), n_samples, atol, rtol)
    finally:
        model.train(was_training)
    model.train()
    try:
        check_gradients(model, -model.log_prob(y).mean())
    finally:
        model.train(was_training)
    if isinstance(model, LatentVariable):
        _check_latent_variable(model, y, atol, rtol, was_training)
    if isinstance(model, IndependentTerms):
        _check_independent_terms(model, y, atol, rtol, was_training)
    if isinstance(model, SuperResolution):
        _check_superresolution(model, y, atol, rtol, was_training)


def _check_model_eval(
    model: DensityModel, y: Tensor, batch: int, shape: tuple[int, int, int], n_samples: int,
    atol: float, rtol: float,
) -> None:
    y_before = y.clone()
    stochastic = isinstance(model, LatentVariable)
    model = _FixedNoise(model) if stochastic else model
    parts = model.log_prob_parts(y)
    _unchanged(y_before, y, "log_prob_parts")
    dims = model.part_dims()
    assert isinstance(parts, dict) and parts, f"log_prob_parts returned {type(parts).__name__}, not a non-empty dict"
    assert list(parts) == list(dims), f"log_prob_parts has terms {list(parts)} but part_dims has {list(dims)}"
    for name, term in parts.items():
        assert term.shape == (batch,), f"term {name} has shape {tuple(term.shape)}, not ({batch},)"
        assert torch.isfinite(term).all(), f"term {name} is not finite: {term.tolist()}"
    # A latent-variable model's KL term is over no image dimension.
    least = 0 if stochastic else 1
    bad = {name: d for name, d in dims.items() if not (isinstance(d, int) and d >= least)}
    assert not bad, f"part_dims must be {'non-negative' if stochastic else 'positive'} integers, got {bad}"
    total = math.prod(shape)
    assert sum(dims.values()) == total, f"part_dims {dims} add up to {sum(dims.values())}, not D = {total}"
    log_prob = model.log_prob(y)
    assert log_prob.shape == (batch,), f"log_prob has shape {tuple(log_prob.shape)}, not ({batch},)"
    expected = torch.promote_types(y.dtype, torch.float32)
    assert log_prob.dtype == expected, f"log_prob is {log_prob.dtype}, not the promoted {expected}"
    _close(log_prob, torch.stack(list(parts.values())).sum(0), atol, rtol, "log_prob != the sum of log_prob_parts")
    check_rows_independent(model.log_prob_parts, y, atol=atol, rtol=rtol)

    groups = model.parameter_groups()
    seen: dict[int, str] = {}
    for name, params in groups.items():
        for p in params:
            assert isinstance(p, nn.Parameter), f"group {name} holds a {type(p).__name__}, not a Parameter"
            assert id(p) not in seen, f"a parameter is in groups {seen[id(p)]} and {name}"
            seen[id(p)] = name
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    assert not missing, f"trainable parameters in no group (the optimiser would never update them): {missing[:5]}"

    for temperature in (0.0, 1.0):
        with torch.random.fork_rng():
            torch.manual_seed(1)
            first = model.sample(n_samples, temperature)
            torch.manual_seed(2)
            second = model.sample(n_samples, temperature)
        assert tuple(first.shape) == (n_samples, *shape), (
            f"sample({n_samples}, {temperature}) has shape {tuple(first.shape)}, expected {(n_samples, *shape)}")
        assert first.dtype == y.dtype, f"sample gave {first.dtype} for a model evaluated in {y.dtype}"
        if temperature == 0.0:
            torch.testing.assert_close(first, second, atol=atol, rtol=rtol, equal_nan=True,
                                       msg=lambda m: f"sample at temperature 0 is random: {m}")


class _FixedNoise:
    """A `LatentVariable` model whose ``log_prob_parts`` and ``log_prob`` draw from one fixed
    random state at every call (the global state is left as it was), so that two calls, and row
    i of two batches of one size, see the same draws; every other attribute is the model's."""

    def __init__(self, model: DensityModel, seed: int = 0) -> None:
        self._model, self._seed = model, seed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def _seeded(self, fn: Any, y: Tensor) -> Any:
        with torch.random.fork_rng(devices=[y.device] if y.device.type == "cuda" else []):
            torch.manual_seed(self._seed)
            return fn(y)

    def log_prob_parts(self, y: Tensor) -> dict[str, Tensor]:
        return self._seeded(self._model.log_prob_parts, y)

    def log_prob(self, y: Tensor) -> Tensor:
        return self._seeded(self._model.log_prob, y)


def _check_latent_variable(model: Any, y: Tensor, atol: float, rtol: float, was_training: bool,
                           draws: int = 256) -> None:
    model.eval()
    try:
        fixed = _FixedNoise(model)
        weights = fixed._seeded(model.log_joint_sample, y)
        assert weights.shape == (y.shape[0],), f"log_joint_sample has shape {tuple(weights.shape)}, not ({y.shape[0]},)"
        expected = torch.promote_types(y.dtype, torch.float32)
        assert weights.dtype == expected, f"log_joint_sample is {weights.dtype}, not the promoted {expected}"
        assert torch.isfinite(weights).all(), f"log_joint_sample is not finite: {weights.tolist()}"
        _close(fixed._seeded(model.log_joint_sample, y), weights, atol, rtol,
               "log_joint_sample differs between two calls from one random state")
        check_rows_independent(lambda v: fixed._seeded(model.log_joint_sample, v), y, atol=atol, rtol=rtol)
        # Both estimate the ELBO of one image: compare their means over many draws, paired row by
        # row from one random state (where a model draws z alike in both, the decoder's noise
        # cancels; the paired standard error is valid either way).
        repeated = y[:1].expand(draws, *y.shape[1:]).contiguous()
        with torch.no_grad():
            bound = fixed._seeded(model.log_prob, repeated).double()
            joint = fixed._seeded(model.log_joint_sample, repeated).double()
        gap = float((joint - bound).mean().abs())
        error = float((joint - bound).std() / draws**0.5)
        assert gap <= SIGMAS * error + atol + rtol * float(bound.mean().abs()), (
            f"the mean of log_joint_sample over {draws} draws ({float(joint.mean()):.6g}) is not the mean of "
            f"log_prob, the ELBO ({float(bound.mean()):.6g}): off by {gap:.3g}, {gap / max(error, 1e-300):.1f} "
            "standard errors")
    finally:
        model.train(was_training)


def _check_independent_terms(model: Any, y: Tensor, atol: float, rtol: float, was_training: bool) -> None:
    groups = model.parameter_groups()
    names = list(model.part_dims())
    assert list(groups) == names, f"parameter groups {list(groups)} are not named like the terms {names}"
    model.eval()
    try:
        parts = {k: v.detach() for k, v in model.log_prob_parts(y).items()}
        for name in names:
            alone = model.log_prob_terms(y, [name])
            assert list(alone) == [name], f"log_prob_terms(y, [{name!r}]) returned terms {list(alone)}"
            _close(alone[name], parts[name], atol, rtol, f"log_prob_terms(y, [{name!r}]) != log_prob_parts(y)[{name!r}]")
        both = model.log_prob_terms(y, names[::-1])
        assert list(both) == names, f"log_prob_terms gave {list(both)}, not the model's order {names}"
    finally:
        model.train(was_training)
    ids = {name: {id(p) for p in params} for name, params in groups.items()}
    model.train()
    try:
        for name in names:
            model.zero_grad(set_to_none=True)
            state = torch.get_rng_state()
            term = model.log_prob_terms(y, [name])[name]
            assert torch.equal(state, torch.get_rng_state()), f"computing term {name} changed the global random state"
            term.sum().backward()
            for p in groups[name]:
                assert p.grad is not None and torch.isfinite(p.grad).all(), (
                    f"a parameter of group {name} got no finite gradient from its own term")
            for other, params in groups.items():
                if other == name:
                    continue
                leaked = [p for p in params if p.grad is not None and bool((p.grad != 0).any())]
                assert not leaked, f"term {name}'s gradient reaches {len(leaked)} parameters of group {other}"
            others = [n for n, p in model.named_parameters() if p.grad is not None and bool((p.grad != 0).any())
                      and id(p) not in ids[name]]
            assert not others, f"term {name}'s gradient reaches parameters of no group or another: {others[:5]}"
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def _check_superresolution(model: Any, y: Tensor, atol: float, rtol: float, was_training: bool) -> None:
    levels = model.levels
    model.eval()
    try:
        full = model.reduce(y, levels)
        _close(model.superres(full, levels, 1.0), y, atol, rtol, "superres(reduce(y, levels), levels) != y")
        _close(model.low_to_image(full, levels), y, atol, rtol, "low_to_image(reduce(y, levels), levels) != y")
        for level in range(levels):
            low = model.reduce(y, level)
            sampled = model.superres(low, level, 1.0)
            assert sampled.shape == y.shape, f"superres from level {level} gave shape {tuple(sampled.shape)}"
            _close(model.reduce(sampled, level), low, atol, rtol,
                   f"an image super-resolved from level {level} does not reduce to the image it was given")
            shown = model.low_to_image(low, level)
            assert shown.min() >= 0 and shown.max() < 1, f"low_to_image at level {level} is outside [0, 1)"
    finally:
        model.train(was_training)


# -- datasets -------------------------------------------------------------------------------


def check_dataset(dataset: ImageDataset, params: Any = None) -> None:
    """A dataset: uint8 ``(N, C, H, W)`` train and test arrays of one image shape, values within
    ``max_value``, C in 1, 3, 4; labels, where it has them, int64 ``(N,)`` in ``0 .. K - 1`` for its
    K named classes; with ``params`` (its `DataParams`), the limits are honoured. Reads every
    image: for the small datasets a contract test builds, not a memory-mapped store at full size."""
    assert isinstance(dataset, ImageDataset), f"the factory returned a {type(dataset).__name__}, not an ImageDataset"
    assert isinstance(dataset.name, str) and dataset.name, "the dataset has no name"
    assert 1 <= dataset.max_value <= 255, f"max_value = {dataset.max_value} is outside 1..255"
    for split in ("train", "test"):
        images = getattr(dataset, split)
        assert isinstance(images, np.ndarray), f"{split} is a {type(images).__name__}, not a numpy array"
        assert images.dtype == np.uint8, f"{split} has dtype {images.dtype}, not uint8"
        assert images.ndim == 4, f"{split} has shape {images.shape}, not (N, C, H, W)"
        assert len(images) >= 1, f"{split} holds no images"
        assert images.shape[1] in (1, 3, 4), f"{split} has shape {images.shape}: C must be 1, 3 or 4 (NCHW)"
        top = int(images.max())
        assert top <= dataset.max_value, f"{split} holds values up to {top}, above max_value = {dataset.max_value}"
        limit = getattr(params, f"limit_{split}", 0) if params is not None else 0
        assert not limit or len(images) <= limit, f"{split} has {len(images)} images, above limit_{split} = {limit}"
    assert dataset.train.shape[1:] == dataset.test.shape[1:], "train and test images differ in shape"
    assert dataset.shape == tuple(int(s) for s in dataset.train.shape[1:]), f"shape is {dataset.shape}"
    if dataset.train_labels is None:
        assert dataset.test_labels is None and not dataset.classes, "classes or test labels without train labels"
        return
    k = dataset.num_classes
    assert k >= 1 and all(isinstance(c, str) and c for c in dataset.classes), f"classes are {dataset.classes!r}"
    for split in ("train", "test"):
        labels = getattr(dataset, f"{split}_labels")
        assert labels is not None and labels.dtype == np.int64, f"{split} labels are not int64"
        assert labels.shape == (len(getattr(dataset, split)),), f"{split} labels have shape {labels.shape}"
        assert labels.min() >= 0 and labels.max() < k, f"{split} labels range over {labels.min()}..{labels.max()}, K = {k}"
