"""The engine's own recipe sections: ``[recipe]``, ``[train]``, ``[eval]``, ``[sample]``, ``[log]``.

Part sections (``[data]``, ``[dequantizer]``, ``[model]``) are validated against the Params
of the part their ``use`` key selects.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Literal

from flowkit.contracts.transform import InverseSolver
from flowkit.params import param

SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class RecipeMeta:
    schema: int = param(SCHEMA_VERSION, "recipe format version")
    name: str = param(doc="run name; the run directory is runs/<name>-<timestamp>")
    description: str = param("", "which paper configuration this follows and what was scaled down")
    extends: str = param("", "a recipe this one is merged over (path relative to this file)")

    def __post_init__(self) -> None:
        if self.schema != SCHEMA_VERSION:
            raise ValueError(f"schema = {self.schema} is not supported; this flowkit reads schema {SCHEMA_VERSION}.")


@dataclass(frozen=True, kw_only=True)
class TrainParams:
    optimizer: Literal["adamax", "adamax_openai", "adam", "adamw"] = param(
        "adamax", "optimizer; adamax_openai: the Adamax of openai/glow's optim.py (also Wavelet Flow's), whose step "
        "is lr * sqrt(1 - beta2^t) / (1 - beta1^t)")
    betas: tuple[float, ...] = param(
        (0.9, 0.999), "the optimizer's (beta1, beta2); openai/glow's Adamax uses beta2 = 1 - 1/(steps per epoch)")
    lr: float = param(1e-3, "peak learning rate")
    weight_decay: float = param(0.0, "weight decay (decoupled for adamw)")
    warmup_steps: int = param(0, "linear learning-rate warm-up from 0 over this many steps")
    decay: Literal["none", "cosine", "exponential"] = param(
        "none", "learning-rate decay after warm-up: cosine over the step or time budget, or exponential per step")
    decay_rate: float = param(1.0, "decay = exponential: the learning rate is multiplied by this every step after warm-up")
    batch_size: int = param(64, "images per optimizer step (the global batch)")
    accumulate: int = param(
        1, "split each step's batch into this many micro-batches whose gradients add up (less memory, same step)")
    steps: int = param(0, "stop after this many steps (0: no step limit)")
    minutes: float = param(0.0, "stop after this many minutes of training (0: no time limit)")
    grad_clip: float = param(0.0, "max gradient norm (0: off), per parameter group or over all of them (grad_clip_scope)")
    grad_clip_scope: Literal["group", "global"] = param(
        "group", "group: clip each parameter group alone (Wavelet Flow's levels stay independent); global: one norm "
        "over model and dequantizer together (Flow++)")
    ema: float = param(
        0.0, "keep an exponential moving average of the weights with this decay (Flow++: 0.999) and evaluate and "
        "sample with it (0: off)")
    shift_augment: float = param(
        0.0, "translate each training image by up to this fraction of its side, edge pixels repeated "
        "(openai/glow on CIFAR-10: 0.1; 0: off)")
    seed: int = param(0, "seed of weights, data order and dequantization noise")
    label_dropout: float = param(
        0.0, "replace each training label by K (\"no class\") with this probability, drawn per (seed, step) on "
        "the training thread, so one network also learns the unconditional model (needs data.labels = true)")
    prefetch: int = param(
        2, "batches read ahead in a background thread that only reads and copies (pinned memory, non-blocking "
        "host-to-device on CUDA); the batches are the same with any value (0: read on the training thread)")
    level: int = param(-1, "train one parameter group alone (a Wavelet Flow level, 0 = base); -1: all")
    init_batch_size: int = param(512, "images for the data-dependent (actnorm) initialisation")
    eval_every: int = param(0, "evaluate the test set every N steps (0: only at the end)")
    eval_every_seconds: float = param(
        0.0, "also evaluate every this many seconds of training, for learning curves (0: off)")
    eval_images: int = param(0, "test images of the periodic evaluations: the first N, a fixed subset (0: all)")
    eval_batch_size: int = param(500, "images per evaluation batch")
    log_every: int = param(50, "write a metrics.jsonl line every N steps")
    checkpoint_every: int = param(0, "write a checkpoint every N steps (0: only at the end)")
    device: str = param("auto", '"auto" (cuda if available), "cpu", "cuda", "cuda:1", ...')
    threads: int = param(0, "CPU threads for torch (0: all cores)")
    level_threads: int = param(
        1, "train a model's independent terms (Wavelet Flow's levels) side by side in this many "
        "threads, torch single-threaded in each (1: off; faster than intra-op threads on few cores)")
    amp: Literal["off", "bf16"] = param(
        "off", "bf16: autocast the nets (convolutions, matmuls) to bfloat16; each transform's map, log-det and "
        "the likelihood stay float32 (any device; on CPUs without bf16 units it is slower, for checks only)")
    compile: Literal["off", "default", "max-autotune"] = param(
        "off", "torch.compile the model's log-density for training (its forward and backward; evaluation and "
        "sampling stay eager): default or max-autotune mode. The first step compiles (minutes on a CPU, counted "
        "as training time); docs/performance.md has what it gains")
    channels_last: bool = param(
        False, "keep the model's weights and the training batches in channels-last memory format (NHWC), "
        "the layout oneDNN and cuDNN convolutions run fastest in; same values, another layout")
    memory: Literal["store", "recompute"] = param(
        "store", "store: keep every flow step's activations for backward; recompute: keep none, rebuild each "
        "step's input from its output with the inverse in backward (memory flat in depth; costs about one "
        "extra forward and one inverse per step). Not with train.level_threads > 1: the recomputation replays "
        "random draws by restoring torch's global RNG, which the other threads draw from; set level_threads = 1")

    def __post_init__(self) -> None:
        for key in ("batch_size", "init_batch_size", "eval_batch_size", "log_every", "level_threads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} = {getattr(self, key)} must be at least 1.")
        for key in ("steps", "warmup_steps", "eval_every", "checkpoint_every", "threads", "eval_images"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} = {getattr(self, key)} must be >= 0.")
        if self.minutes < 0 or self.lr <= 0 or self.grad_clip < 0 or self.eval_every_seconds < 0:
            raise ValueError("minutes, grad_clip and eval_every_seconds must be >= 0 and lr > 0.")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas = {list(self.betas)} must be two numbers in [0, 1).")
        if not 0 < self.decay_rate <= 1:
            raise ValueError(f"decay_rate = {self.decay_rate} must be in (0, 1].")
        if self.accumulate < 1 or self.batch_size % self.accumulate:
            raise ValueError(f"accumulate = {self.accumulate} must be >= 1 and divide batch_size = {self.batch_size}.")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema = {self.ema} must be in [0, 1).")
        if not 0 <= self.label_dropout <= 1:
            raise ValueError(f"label_dropout = {self.label_dropout} must be in [0, 1].")
        if self.prefetch < 0:
            raise ValueError(f"prefetch = {self.prefetch} must be >= 0.")
        if not 0 <= self.shift_augment < 0.5:
            raise ValueError(f"shift_augment = {self.shift_augment} must be in [0, 0.5).")
        if self.steps == 0 and self.minutes == 0:
            raise ValueError("set a budget: steps > 0 or minutes > 0.")


@dataclass(frozen=True, kw_only=True)
class EvalParams:
    """How the final test figure is computed, beside the dequantized bound that is always reported."""

    iw_samples: int = param(
        0, "also report the importance-weighted estimate of log P(x) with this many dequantization (and latent) "
        "samples per test image (Flow++: 4096, MaCow: 512; 0: off)")
    iw_images: int = param(0, "the importance-weighted estimate over the first N test images (0: all)")
    iw_batch_size: int = param(0, "images per importance-weighted batch (0: train.eval_batch_size)")
    class_images: int = param(
        0, "a class-conditional run (data.labels) reports the marginal bits/dim and the Bayes classifier's accuracy "
        "over the first N test images (0: all); each image costs one evaluation of the model per class")

    def __post_init__(self) -> None:
        for key in ("iw_samples", "iw_images", "iw_batch_size", "class_images"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} = {getattr(self, key)} must be >= 0.")


@dataclass(frozen=True, kw_only=True)
class SampleParams:
    n: int = param(64, "images per sample grid")
    temperatures: tuple[float, ...] = param((1.0, 0.7), "one grid per temperature")
    seed: int = param(1234, "seed of the sampling noise")
    guidance: tuple[float, ...] = param(
        (), "a class-conditional run (data.labels) also draws its class rows with classifier-free guidance at each "
        "weight w (h = h_c + w (h_c - h_u) on every net's output; a guided sample has no exact density)")
    solver: Literal["sequential", "jacobi"] = param(
        "sequential", "how steps whose inverse runs position by position (TarFlow's) invert when sampling: sequential "
        "(exact; one net call per token, with a key/value cache) or jacobi (every token at once, iterated until no "
        "value moves by more than jacobi_tol); models that invert in closed form ignore it")
    jacobi_tol: float = param(1e-4, "solver = jacobi: stop when no value of a step's iterate moves by more than this")
    jacobi_max_iter: int = param(0, "solver = jacobi: at most this many iterations per step (0: as many as tokens, "
                                    "after which the iterate is exact)")
    denoise: bool = param(
        False, "also write denoised grids: one step y + sigma^2 grad log p(y) (TarFlow's score-based denoising; "
        "needs a dequantizer with Gaussian noise, whose std is sigma)")

    def __post_init__(self) -> None:
        if self.n < 1 or any(t < 0 for t in self.temperatures):
            raise ValueError("n must be at least 1 and temperatures >= 0.")
        if not all(math.isfinite(w) for w in self.guidance):
            raise ValueError(f"guidance = {list(self.guidance)}: every weight must be a finite number.")
        if not self.jacobi_tol >= 0 or self.jacobi_max_iter < 0:
            raise ValueError("jacobi_tol and jacobi_max_iter must be >= 0.")

    def inverse_solver(self) -> InverseSolver:
        """The solver of sequential inverses these settings ask for."""
        return InverseSolver(self.solver, self.jacobi_tol, self.jacobi_max_iter)


@dataclass(frozen=True, kw_only=True)
class LogParams:
    """Where a run's measurements go besides metrics.jsonl, which is always written."""

    tensorboard: bool = param(
        False, "also write TensorBoard event files to the run's tb/ folder: the metrics.jsonl scalars, test and "
        "per-level bits/dim, sample grids (needs pip install 'flowkit[tensorboard]')")
