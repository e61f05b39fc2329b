"""The contracts every part honours; plugins subclass these."""

from flowkit.contracts.dataset import DataParams, ImageDataset
from flowkit.contracts.decomposition import Decomposition, DecompositionLayer
from flowkit.contracts.dequantizer import Dequantizer
from flowkit.contracts.model import DensityModel, IndependentTerms, SuperResolution
from flowkit.contracts.prior import Prior
from flowkit.contracts.transform import Sequential, Transform

__all__ = [
    "DataParams", "Decomposition", "DecompositionLayer", "DensityModel", "Dequantizer", "ImageDataset",
    "IndependentTerms", "Prior", "Sequential", "SuperResolution", "Transform",
]
