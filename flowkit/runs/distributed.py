"""Data parallel training under torchrun: one process per device, gradients all-reduced by
`torch.nn.parallel.DistributedDataParallel`.

torchrun starts ``WORLD_SIZE`` copies of ``flowkit run`` and tells each its ``RANK`` (global)
and ``LOCAL_RANK`` (on its node) in the environment; one process alone is a world of size 1
and none of this is used. Every rank builds the same session from the same recipe and seed,
so the weights start equal (DDP broadcasts rank 0's anyway when it wraps them). Each step,
every rank computes the same global batch indices (a function of seed and step) and trains
on its ``1 / WORLD_SIZE`` slice of them; DDP averages the gradients, so the step is the
one of the whole global batch. Rank 0 alone writes the run directory.

After every step the ranks also agree, through `agree`, on rank 0's training clock and on
whether any rank was asked to stop: a two-number all-reduce of a CPU tensor over a gloo group
of its own (`init` makes it), so that the budget, a time-based learning rate and a stop on a
signal are decided alike on every rank after every step, without waiting for a GPU.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from flowkit.errors import FlowkitError, RecipeError
from flowkit.recipes.load import Recipe
from flowkit.runs.objective import Objective


@dataclass(frozen=True)
class World:
    """This process's place among torchrun's: ``size`` processes, of which this is ``rank``."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0, the one process that writes the run directory and evaluates."""
        return self.rank == 0


def world() -> World:
    """This process's `World`, from torchrun's environment; a world of one when it is unset."""
    env = os.environ
    try:
        found = World(int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")))
    except ValueError:
        raise FlowkitError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them); got "
                           f"{env.get('WORLD_SIZE')!r}, {env.get('RANK')!r} and {env.get('LOCAL_RANK')!r}.") from None
    if found.size < 1 or not 0 <= found.rank < found.size or found.local_rank < 0:
        raise FlowkitError(f"RANK = {found.rank} must be in [0, WORLD_SIZE = {found.size}) and LOCAL_RANK >= 0.")
    return found


def is_main() -> bool:
    return world().main


def rank_device(device: torch.device, w: World) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when the recipe asks for CUDA under torchrun.
    A recipe naming one GPU is refused on every rank, also the one whose LOCAL_RANK it names."""
    if w.size == 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise FlowkitError(f'train.device = "{device}" names one GPU, but under torchrun each process uses '
                           'cuda:LOCAL_RANK; set train.device = "cuda" or "auto".')
    return torch.device("cuda", w.local_rank)


def backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def check_world_fit(recipe: Recipe, w: World) -> None:
    """What data parallel training asks of a recipe, checked before a run directory exists."""
    if w.size == 1:
        return
    train, source = recipe.train, recipe.source
    if train.batch_size % (w.size * train.accumulate):
        raise RecipeError(
            f"train.batch_size = {train.batch_size} is the global batch, split over WORLD_SIZE = {w.size} processes "
            f"and train.accumulate = {train.accumulate} micro-batches each; it must be divisible by "
            f"{w.size} x {train.accumulate} = {w.size * train.accumulate}.", source)
    if train.level_threads > 1:
        raise RecipeError(f"train.level_threads = {train.level_threads} trains the levels in threads of one process, "
                          f"which data parallel training (WORLD_SIZE = {w.size}) does not combine with; "
                          "set train.level_threads = 1.", source)


# The gloo group of `agree`, made by `init` beside the default group (which is nccl on CUDA).
_host_group: dist.ProcessGroup | None = None


def init(device: torch.device) -> World:
    """Joins torchrun's process group (gloo on the CPU, nccl on CUDA) unless this is a world of one
    or it is joined already, and makes the gloo group of `agree`. The rendezvous address comes
    from the environment (``env://``)."""
    global _host_group
    w = world()
    if w.size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend(device), rank=w.rank, world_size=w.size)
    if w.size > 1 and _host_group is None:
        _host_group = dist.new_group(backend="gloo")  # collective: every rank makes it here
    return w


def shutdown() -> None:
    """Leaves the process group, if this process joined one; again, it does nothing."""
    global _host_group
    _host_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # every group, `agree`'s too


def agree(seconds: float, stop: bool) -> tuple[float, bool]:
    """Rank 0's ``seconds`` and whether any rank's ``stop`` is set, the same on every rank: one
    all-reduce of a CPU tensor over the gloo group `init` made, so it never waits for a GPU (the
    ranks only wait for each other). The trainer calls it after every step."""
    if _host_group is None:
        raise RuntimeError("distributed.agree needs the process group of distributed.init.")
    values = torch.tensor([seconds if is_main() else 0.0, float(stop)], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=_host_group)
    agreed, stops = values.tolist()
    return agreed, stops > 0


def active() -> bool:
    """Whether this process trains with others (a joined process group of more than one)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard(indices: Tensor, w: World) -> Tensor:
    """This rank's slice of a global batch's indices: equal, contiguous slices by rank."""
    return indices.tensor_split(w.size)[w.rank]


def shard_start(n: int, w: World) -> int:
    """Where this rank's slice of a global batch of ``n`` starts (`shard`'s slices)."""
    return sum(len(part) for part in torch.arange(n).tensor_split(w.size)[: w.rank])


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of rank > 0 for ``step``, set before every step: its dequantization noise must
    differ from rank 0's, whose stream is the one checkpoints carry, and depend on the step alone,
    so that a run resumed with the same number of processes draws what an uninterrupted one drew
    (another number splits the batch otherwise, docs/scale-out.md)."""
    return zlib.crc32(f"{seed}/{rank}/{step}".encode()) + (rank << 32)


def sum_over_ranks(values: Tensor) -> Tensor:
    """The sum of ``values`` over every rank (in place, returned for convenience)."""
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class ObjectiveModule(nn.Module):
    """`Objective.loss` as a module, so that DDP can wrap it: the model and the dequantizer are its
    submodules, and ``forward(x, labels)`` returns the mean bits/dim of ``x`` and its terms."""

    def __init__(self, objective: Objective, names: Sequence[str] | None) -> None:
        super().__init__()
        self.model, self.dequantizer = objective.model, objective.dequantizer
        self.objective, self.names = objective, names

    def forward(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        return self.objective.loss(x, self.names, labels)


def data_parallel(objective: Objective, names: Sequence[str] | None, device: torch.device) -> DistributedDataParallel:
    """The objective under DDP; call after the data-dependent initialisation or a resume: DDP
    broadcasts rank 0's parameters and buffers when it wraps them, so every rank starts equal.

    With ``names`` (train.level) the other terms' parameters get no gradient, which DDP must be told
    (``find_unused_parameters``) or it waits for them forever.
    """
    return DistributedDataParallel(ObjectiveModule(objective, names),
                                   device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=names is not None)
