"""flowkit: a plugin-based toolkit for normalizing flows on images.

Public API: `hookimpl` for plugins, the contracts, the errors, `build`, `load_recipe`, `train`
and `load_run`.
"""

from __future__ import annotations

from flowkit.api import build, load_recipe, load_run, ref, train
from flowkit.contracts import (
    DataParams, Decomposition, DecompositionLayer, DensityModel, Dequantizer, ImageDataset, IndependentTerms, Prior,
    Sequential, SuperResolution, Transform,
)
from flowkit.errors import (
    DataError, FlowkitError, InverseNotAvailable, PluginError, RecipeError, ShapeError,
    TrainingError, UnknownPartError,
)
from flowkit.hookspecs import hookimpl
from flowkit.params import Copies, Derive, NoParams, PartRef, param, part_field

__version__ = "0.1.0"

__all__ = [
    "Copies", "DataError", "DataParams", "Decomposition", "DecompositionLayer", "DensityModel", "Dequantizer",
    "Derive", "FlowkitError", "ImageDataset", "IndependentTerms", "InverseNotAvailable", "NoParams", "PartRef",
    "PluginError", "Prior", "RecipeError", "Sequential", "ShapeError", "SuperResolution", "TrainingError",
    "Transform", "UnknownPartError", "build", "hookimpl", "load_recipe", "load_run", "param", "part_field", "ref",
    "train",
]
