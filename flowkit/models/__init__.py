"""Shared model assembly: the layout walker (`flowkit.models.layout`), the model that is one
layout flow (`flowkit.models.model.LayoutModel`) and the fixed preprocessing maps
(`flowkit.models.preprocess`) that Glow, MaCow, Flow++, RealNVP and the VAE-flow decoder use.

A model plugin lists *what* it stacks (steps, squeezes, splits) and hands the list to
`LayoutFlow`, which builds it and walks it in both directions.
"""

from flowkit.models.layout import (
    Chain,
    Entry,
    FactorOut,
    LayoutFlow,
    Split,
    Squeeze,
    SqueezeLayer,
    Step,
    Unsqueeze,
    rename_state_dict_keys,
)
from flowkit.models.conditional import ClassConditioned
from flowkit.models.model import LayoutModel, OneLatentLevel
from flowkit.models.preprocess import Centre, Logit, Rescale

__all__ = [
    "Centre", "Chain", "ClassConditioned", "Entry", "FactorOut", "LayoutFlow", "LayoutModel", "Logit", "OneLatentLevel", "Rescale", "Split",
    "Squeeze", "SqueezeLayer", "Step", "Unsqueeze", "rename_state_dict_keys",
]
