"""Everything a run needs, built from a validated recipe: data, dequantizer, model, device."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from flowkit.build import Builder
from flowkit.contracts.dataset import ImageDataset
from flowkit.contracts.dequantizer import Dequantizer
from flowkit.contracts.model import DensityModel, IndependentTerms
from flowkit.contracts.transform import sequential_inverses, use_recompute
from flowkit.errors import FlowkitError, RecipeError, ShapeError
from flowkit.models.conditional import ClassConditioned
from flowkit.nn.guidance import Guidance
from flowkit.plugins import Plugins
from flowkit.recipes.load import Recipe
from flowkit.runs import distributed
from flowkit.runs.data import Split
from flowkit.runs.ema import WeightAverage, weight_average
from flowkit.runs.objective import Objective


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise FlowkitError(f'train.device = "{name}" is not a device: {exc}.') from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlowkitError(f'train.device = "{name}" but no CUDA device is available; use "cpu" or "auto".')
    return device


@dataclass
class Session:
    """The built parts of one run. Images stay where the dataset keeps them (in memory or
    memory-mapped), as uint8, and are read, reduced to n_bits and moved per batch
    (`flowkit.runs.data.Split`); ``train_x.labels`` and ``test_x.labels`` are the labels when
    data.labels asks for them, else None."""

    recipe: Recipe
    dataset: ImageDataset
    train_x: Split
    test_x: Split
    model: DensityModel
    dequantizer: Dequantizer
    device: torch.device
    average: WeightAverage | None = None  # train.ema: the averaged weights, for evaluation and sampling
    conditioning: ClassConditioned | None = None  # data.labels: the model as a class-conditional one

    @property
    def n_bits(self) -> int:
        return self.recipe.data.params.n_bits

    @property
    def num_dims(self) -> int:
        c, h, w = self.dataset.shape
        return c * h * w

    @property
    def num_classes(self) -> int:
        """K, the dataset's class count when data.labels asks for labels (0 otherwise); the label
        K is "no class" (train.label_dropout)."""
        return self.dataset.num_classes if self.train_x.labels is not None else 0

    @property
    def objective(self) -> Objective:
        return Objective(self.model, self.dequantizer, self.n_bits, self.num_dims, self.recipe.train.amp,
                         self.conditioning)

    def modules(self) -> dict[str, torch.nn.Module]:
        """What a checkpoint holds: the model, the dequantizer and, with train.ema, their average."""
        modules = {"model": self.model, "dequantizer": self.dequantizer}
        if self.average is not None:
            modules["ema"] = self.average
        return modules

    @contextlib.contextmanager
    def evaluation_weights(self) -> Iterator[None]:
        """The weights a recipe evaluates and samples with: the average under train.ema, else the
        trained ones."""
        with self.average.swapped_in() if self.average is not None else contextlib.nullcontext():
            yield


def build_session(recipe: Recipe, plugins: Plugins, *, with_data: bool = True) -> Session:
    """Seeds, loads the data, builds the model and dequantizer on the chosen device."""
    train = recipe.train
    torch.manual_seed(train.seed)
    torch.set_num_threads(train.threads or os.cpu_count() or 1)
    build = Builder(plugins.registries)
    dataset: ImageDataset = build(recipe.data)
    train_x, test_x = splits(recipe, dataset)
    if len(train_x) == 0 or len(test_x) == 0:
        raise FlowkitError(f"dataset {dataset.name} has {len(train_x)} training and {len(test_x)} test images; both must be > 0.")
    world = distributed.world()  # under torchrun: one process per device, cuda:LOCAL_RANK
    device = distributed.rank_device(pick_device(train.device), world)
    num_classes = dataset.num_classes if train_x.labels is not None else 0
    guidance = Guidance() if num_classes else None
    try:
        model: DensityModel = build_model(recipe, build, dataset.shape, num_classes, guidance)
        dequantizer: Dequantizer = build(recipe.dequantizer, in_shape=dataset.shape)
    except ShapeError as exc:
        raise FlowkitError(f"{recipe.source}: [model] does not fit {dataset.name} images of shape {dataset.shape}: {exc}") from None
    check_training_fit(recipe, model, dequantizer)
    distributed.check_world_fit(recipe, world)
    model, dequantizer = model.to(device), dequantizer.to(device)
    if train.channels_last:  # 4-d weights only; the values are the same
        model, dequantizer = model.to(memory_format=torch.channels_last), dequantizer.to(memory_format=torch.channels_last)
    use_recompute(model, dequantizer, enabled=train.memory == "recompute")
    average = weight_average({"model": model, "dequantizer": dequantizer}, train.ema)
    distributed.init(device)  # joins torchrun's process group once the recipe is known to fit
    conditioning = ClassConditioned(model, num_classes, guidance) if num_classes else None
    return Session(recipe, dataset, train_x, test_x, model, dequantizer, device, average, conditioning)


def build_model(recipe: Recipe, build: Builder, shape: tuple[int, int, int], num_classes: int,
                guidance: Guidance | None) -> DensityModel:
    """The recipe's model; with ``num_classes`` K > 0 (data.labels), class-conditional: built with a
    vector context of K + 1 entries (K: "no class") and every net and prior wrapped for guidance
    (`flowkit.models.conditional`). Only the model is: a learned dequantizer sees no class."""
    if not num_classes:
        return build(recipe.model, in_shape=shape)
    if not build.accepts(recipe.model, "vector"):
        takers = ", ".join(p.name for p in build.registries["model"] if p.accepts("vector"))
        raise RecipeError(f'data.labels = true makes a class-conditional model, but model "{recipe.model.use}" takes '
                          f"no vector context. Models that do: {takers}; or set data.labels = false.", recipe.source)
    guided = Builder(build.registries, guidance=guidance)
    model = guided(recipe.model, in_shape=shape, context_shape=(num_classes + 1,))
    build.built.extend(guided.built)  # what was built, as one builder records it
    return model


def splits(recipe: Recipe, dataset: ImageDataset) -> tuple[Split, Split]:
    """The train and test `Split` of ``dataset``, with labels when data.labels asks for them (refused,
    naming the dataset, where it has none). Nothing is read: images are reduced per batch."""
    data = recipe.data.params
    keep = bool(getattr(data, "labels", False))  # a third-party dataset's Params may not subclass DataParams
    if keep and not dataset.has_labels:
        raise RecipeError(
            f'data.labels = true asks for class labels, but dataset "{recipe.data.use}" ({dataset.name}, '
            f"{dataset.source or 'no file'}) has none. Datasets with labels: mnist, cifar10, npz with y_train and "
            "y_test, image_folder and store with class subfolders; or set data.labels = false.", recipe.source)
    return (Split(dataset.train, dataset.train_labels if keep else None, data.n_bits, dataset.max_value),
            Split(dataset.test, dataset.test_labels if keep else None, data.n_bits, dataset.max_value))


def check_training_fit(recipe: Recipe, model: DensityModel, dequantizer: Dequantizer) -> None:
    """What train.level and train.level_threads ask of the built parts, checked here so that a
    misfit is reported before the run directory exists.

    train.level = i trains the i-th term alone and train.level_threads > 1 trains the terms side
    by side: both need terms that are densities of their own with their own parameters
    (`IndependentTerms`) and a dequantizer without parameters (a learned one feeds every term).
    Side by side also excludes train.memory = "recompute", whose replay resets the RNG that
    every thread draws from; so does a step whose inverse is solved position by position
    (`flowkit.contracts.transform.Transform.sequential_inverse`: TarFlow's), which the
    recomputation would run in every backward pass.
    """
    train, source = recipe.train, recipe.source
    if dequantizer.figure != "bits_per_dim" and (train.level >= 0 or recipe.eval.iw_samples):
        key = f"train.level = {train.level}" if train.level >= 0 else f"eval.iw_samples = {recipe.eval.iw_samples}"
        raise RecipeError(f"{key} reports bits/dim, and dequantizer.use = \"{recipe.dequantizer.use}\" draws noise that "
                          "leaves each pixel's bin: its figure is the noisy images' NLL, which bounds no bits/dim. "
                          f'Use dequantizer.use = "uniform" or drop {key.split(" =")[0]}.', source)
    if recipe.sample.denoise and dequantizer.noise_std is None:
        raise RecipeError(f'sample.denoise = true steps by the Gaussian noise\'s sigma, and dequantizer.use = '
                          f'"{recipe.dequantizer.use}" adds no Gaussian noise (use "gaussian", or sample.denoise = false).',
                          source)
    sequential = sequential_inverses(model, dequantizer) if train.memory == "recompute" else []
    if sequential:
        shown = ", ".join(sequential[:3]) + (f" and {len(sequential) - 3} more" if len(sequential) > 3 else "")
        raise RecipeError(
            f'train.memory = "recompute" rebuilds every step\'s input with the step\'s inverse in the backward pass, '
            f"and {recipe.model.use}'s steps invert position by position (one call of their net per token, "
            f"sequential_inverse): {shown}. That would cost T net calls per step and backward pass and amplify "
            'round-off along the sequence. Set train.memory = "store".', source)
    learned_dequantizer = any(p.requires_grad for p in dequantizer.parameters())
    independent = isinstance(model, IndependentTerms)
    if train.level >= 0 and not independent:
        raise RecipeError(
            f"train.level = {train.level} (--level) trains one term of the model alone, which needs terms "
            f"that are densities of their own, such as wavelet_flow's levels; {recipe.model.use}'s terms "
            "are not (each depends on the layers before it). Train the whole model (train.level = -1).", source)
    if train.level >= 0:
        names = list(model.parameter_groups())
        if train.level >= len(names):
            allowed = ", ".join(f"{i} ({n})" for i, n in enumerate(names))
            raise RecipeError(f"train.level = {train.level} is out of range; this model's levels are: {allowed}.",
                              source)
        if learned_dequantizer:
            raise RecipeError("train.level trains one level alone, which needs a dequantizer without "
                              'parameters (use = "uniform").', source)
        return
    threads = train.level_threads
    if threads <= 1:
        return
    if not independent:
        raise RecipeError(f"train.level_threads = {threads} needs a model whose terms are independent, such as "
                          f"wavelet_flow; {recipe.model.use} is not. Set train.level_threads = 1.", source)
    if learned_dequantizer:
        raise RecipeError(f"train.level_threads = {threads} needs a dequantizer without parameters "
                          f'(use = "uniform"); {recipe.dequantizer.use} is learned and feeds every term. '
                          "Set train.level_threads = 1.", source)
    if train.memory == "recompute":
        # The replay sets torch's global RNG back to a unit's state while the other threads draw
        # from that same RNG: their dropout masks, and so the gradients, would be wrong.
        raise RecipeError(f'train.memory = "recompute" does not combine with train.level_threads = {threads}: '
                          "recomputing a flow step replays its random draws by restoring torch's global RNG, "
                          "which the other level threads draw from at the same time, so dropout masks and "
                          'gradients would be wrong. Set train.level_threads = 1 (or train.memory = "store").',
                          source)
