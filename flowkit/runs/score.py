r"""Per-image scores of a trained run and how well they tell two sets of images apart
(``flowkit score``, ``run.score``): what users do with an exact density besides report it.

Every score is "higher = less like the training data", in bits per dimension:

- ``bpd``: the run's dequantized bound on -log2 P(x) / D (`flowkit.runs.bpd`, one seeded draw
  of the dequantization noise, as ``run.bpd``);
- ``bpd/<term>``: each term alone over its own dimensions, for models whose terms are densities
  of their own (Wavelet Flow's levels), else ``bpd_share/<term>``, each term's share;
- ``complexity``: what a lossless compressor needs for the image, bits / D (PNG at its strongest
  setting, or lossless JPEG 2000, through Pillow): a measure of the image's own complexity;
- ``input_complexity``: ``bpd - complexity`` (Serrà et al., "Input complexity and
  out-of-distribution detection with likelihood-based generative models", ICLR 2020: S(x) =
  -log2 p(x) - L(x));
- ``likelihood_ratio``: ``bpd - bpd_reference`` for a second run given as the reference
  (Schirrmeister et al., "Understanding anomaly detection with deep invertible networks through
  hierarchies of distributions and features", NeurIPS 2020: the log-likelihood ratio of the
  model to a general-domain model, in bits per dimension).

Raw likelihoods famously rank a simpler out-of-distribution set as *more* likely (Nalisnick et
al., "Do deep generative models know what they don't know?", ICLR 2019: a flow trained on
CIFAR-10 gives SVHN higher likelihood); the last two scores correct for it. `auroc` measures
how well a score separates the run's test set (negatives) from another set (positives):
0.5 is chance, 1.0 perfect, below 0.5 the score ranks them the wrong way round.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from flowkit.errors import FlowkitError
from flowkit.runs.bpd import figure_key, reduce_bits

if TYPE_CHECKING:
    from flowkit.runs.trained import TrainedRun

#: The lossless compressors of the input-complexity score, by name.
COMPRESSORS = ("png", "jpeg2000")


def compressed_bits_per_dim(x: torch.Tensor | np.ndarray, compressor: str = "png") -> np.ndarray:
    """Bits per dimension a lossless compressor needs for each image of ``x``, uint8 data levels
    ``(B, C, H, W)`` (1 or 3 channels), stored as they are (levels 0..2^n_bits - 1)."""
    if compressor not in COMPRESSORS:
        raise FlowkitError(f'--compressor "{compressor}" is not known; allowed: {", ".join(COMPRESSORS)}.')
    images = np.asarray(x)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise FlowkitError(f"the compressor takes uint8 images (B, 1 or 3, H, W), got {images.dtype} {images.shape}.")
    dims = int(np.prod(images.shape[1:]))
    out = np.empty(len(images))
    for i, image in enumerate(images):
        pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        buffer = io.BytesIO()
        if compressor == "png":
            Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", optimize=True, compress_level=9)
        else:
            Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="JPEG2000", irreversible=False)
        out[i] = 8 * len(buffer.getvalue()) / dims
    return out


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """The area under the ROC curve of a score that should be higher for ``positives``:
    P(score of a positive > score of a negative), ties counting one half (the Mann-Whitney U
    statistic over the product of the set sizes)."""
    neg, pos = np.asarray(negatives, dtype=np.float64), np.asarray(positives, dtype=np.float64)
    if not len(neg) or not len(pos):
        raise FlowkitError("the AUROC needs images in both sets.")
    if not (np.isfinite(neg).all() and np.isfinite(pos).all()):
        raise FlowkitError("a score is not finite (an image the model gives zero density?): no AUROC.")
    both = np.concatenate([neg, pos])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    sorted_values = both[order]
    start = 0
    while start < len(both):  # average ranks over ties
        end = start
        while end + 1 < len(both) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    u = ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(neg) * len(pos)))


def scores(run: TrainedRun, x: torch.Tensor, *, compressor: str = "png", reference: TrainedRun | None = None,
           seed: int | None = None) -> dict[str, np.ndarray]:
    """Every score of the module docstring for images ``x`` (uint8 data levels of the run's shape)."""
    for r in (run, reference):
        # Every score is a bits/dim: a run trained on noisy images has none (its NLL is of noisy images).
        if r is not None and figure_key(r.dequantizer.figure) != "bpd":
            raise FlowkitError(f"run {r.path} was trained on noisy images (dequantizer {r.recipe.dequantizer.use}): "
                               "it has no bits/dim to score with; score with a run trained with uniform or "
                               "variational dequantization.")
    out = {key: value.numpy() for key, value in run.per_image(x, seed=seed).items()}
    out["complexity"] = compressed_bits_per_dim(x, compressor)
    out["input_complexity"] = out["bpd"] - out["complexity"]
    if reference is not None:
        if tuple(reference.shape) != tuple(run.shape) or reference.n_bits != run.n_bits:
            raise FlowkitError(f"the reference run models {reference.shape} images at n_bits = {reference.n_bits}; "
                               f"this run {run.shape} at n_bits = {run.n_bits}: they must match.")
        out["likelihood_ratio"] = out["bpd"] - reference.bpd(x, seed=seed).numpy()
    return out


def separation(inliers: Mapping[str, np.ndarray], outliers: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The AUROC of every score both sets have, inliers as negatives and outliers as positives."""
    return {key: auroc(inliers[key], outliers[key]) for key in inliers if key in outliers}


def read_images(source: str | Path, shape: tuple[int, int, int], n_bits: int) -> torch.Tensor:
    """Images to score, as uint8 data levels ``(B, *shape)``: an ``.npz`` (its ``x_test``, ``x``,
    ``images`` or only array, NHW, NHWC or NCHW uint8 0..255) or a folder of PNG/JPEG files (sorted
    by name, recursively), reduced to ``n_bits`` as training reduces them. Nothing is resized: a
    shape other than the run's is refused, naming both."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if not files:
            raise FlowkitError(f"{path} holds no PNG or JPEG images.")
        mode = "L" if shape[0] == 1 else "RGB"
        try:
            arrays = [np.asarray(Image.open(f).convert(mode)) for f in files]
        except OSError as exc:
            raise FlowkitError(f"an image in {path} cannot be read: {exc}.") from None
        sizes = {a.shape for a in arrays}
        if len(sizes) > 1:
            raise FlowkitError(f"the images in {path} differ in size ({sorted(sizes)[:3]}); score images of one size.")
        images = np.stack(arrays)
    elif path.suffix == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as archive:
            keys = [k for k in ("x_test", "x", "images") if k in archive] or list(archive.keys())
            if not keys:
                raise FlowkitError(f"{path} holds no arrays.")
            images = archive[keys[0]]
    else:
        raise FlowkitError(f"{source} is neither an .npz file nor a folder of images (nor `test`).")
    if images.dtype != np.uint8:
        raise FlowkitError(f"{source}: images must be uint8 0..255, got {images.dtype}.")
    c, h, w = shape
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] == c and images.shape[1] != c:
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4 or tuple(images.shape[1:]) != (c, h, w):
        raise FlowkitError(f"{source}: images of shape {tuple(images.shape[1:])}, but the run models ({c}, {h}, {w}) "
                           "images; convert them first (nothing is resized or padded here).")
    return reduce_bits(torch.from_numpy(np.ascontiguousarray(images)), n_bits)
