"""Checkpoints without pickle: weights and optimizer tensors in safetensors, the rest in JSON.

Layout: ``checkpoints/step-00001234/{weights,optimizer,trainer}.safetensors`` plus
``state.json``, and ``checkpoints/latest.json`` (``{"step": 1234, "path": "step-00001234"}``)
naming the newest complete one. A checkpoint is written to a temporary ``.tmp-*`` folder,
synced, and renamed to a name that does not exist yet (atomic on POSIX); only then is
``latest.json`` replaced atomically, so at every instant it names a complete checkpoint.

A second save of the same step (the final checkpoint after a periodic one at that step, or a
resumed run passing a step a crash left behind) keeps the folder that is there when its
files are byte for byte the same; otherwise it is written as ``step-00001234-1`` (``-2``, ...),
``latest.json`` is pointed at it, and only then is the superseded folder removed. Pruning keeps
the `KEEP` newest checkpoints by (step, revision), always including the one ``latest.json``
names; a pruned folder is renamed to ``.tmp-*`` before it is deleted, so a ``step-*`` folder is
always complete, and the temporaries a crash left behind are removed by the next save.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flowkit.errors import FlowkitError

KEEP = 2  # checkpoints kept on disk: the newest and the one before it
_NAME = re.compile(r"step-(\d+)(?:-(\d+))?")  # step-00001234, or step-00001234-1 for a re-save
_FILES = ("weights.safetensors", "optimizer.safetensors", "trainer.safetensors", "state.json")


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: store independent copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, slots in state["state"].items():
        for name, value in slots.items():
            key = f"{pid}/{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value
            else:
                scalars[key] = value
    return _tensors(tensors), {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _fsync(path: Path) -> None:
    """Flushes a file, or a folder's entries, to disk (folders: POSIX only)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder on Windows cannot be opened; its renames are durable as they are
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checkpoints(directory: Path) -> list[tuple[int, int, Path]]:
    """(step, revision, folder) of every complete checkpoint, oldest first."""
    found = []
    for path in directory.glob("step-*"):
        match = _NAME.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match[1]), int(match[2] or 0), path))
    return sorted(found)


def _same_files(a: Path, b: Path) -> bool:
    return all((b / name).is_file() and filecmp.cmp(a / name, b / name, shallow=False) for name in _FILES)


def save_checkpoint(
    directory: Path, step: int, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
    trainer_tensors: dict[str, torch.Tensor], trainer_state: dict[str, Any],
) -> Path:
    """Writes checkpoint ``step`` atomically and prunes old ones; returns its folder."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=".tmp-"))
    try:
        weights = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
        save_file(_tensors(weights), str(tmp / "weights.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(_tensors(trainer_tensors), str(tmp / "trainer.safetensors"))
        with open(tmp / "state.json", "w", encoding="utf-8") as f:
            json.dump({"step": step, "trainer": trainer_state, "optimizer": opt_meta}, f, indent=2)
        same_step = [(revision, path) for s, revision, path in _checkpoints(directory) if s == step]
        final = next((path for _, path in reversed(same_step) if _same_files(tmp, path)), None)
        if final is not None:  # already on disk, complete: nothing to replace
            shutil.rmtree(tmp)
        else:
            for name in _FILES:
                _fsync(tmp / name)
            revision = same_step[-1][0] + 1 if same_step else 0
            final = directory / (f"step-{step:08d}" + (f"-{revision}" if revision else ""))
            os.replace(tmp, final)  # a fresh name: nothing that latest.json names is touched
            _fsync(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(directory / "latest.json", {"step": step, "path": final.name})
    _fsync(directory)
    _prune(directory, final, step)
    return final


def _prune(directory: Path, latest: Path, step: int) -> None:
    """Removes the superseded saves of ``step``, all but the KEEP - 1 newest other steps, and
    stale temporaries; never ``latest``, the folder latest.json names."""
    found = _checkpoints(directory)
    superseded = [path for s, _, path in found if s == step and path != latest]
    others = [path for s, _, path in found if s != step]
    for path in superseded + others[: max(len(others) - (KEEP - 1), 0)]:
        # Renamed first, so that a crash while deleting never leaves a partial step-* folder.
        trash = Path(tempfile.mkdtemp(dir=directory, prefix=".tmp-"))
        os.replace(path, trash / path.name)
    for stale in directory.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in directory.glob(".latest.json.*.tmp"):
        stale.unlink(missing_ok=True)


def latest_step(directory: Path) -> int | None:
    """The step of the checkpoint ``latest.json`` names, or None when there is none yet."""
    try:
        return int(json.loads((directory / "latest.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_checkpoint(directory: Path) -> Path:
    """The folder ``latest.json`` names; a `FlowkitError` when it is missing, unreadable or dangling."""
    pointer = directory / "latest.json"
    if not pointer.is_file():
        raise FlowkitError(f"{directory} holds no checkpoint (no latest.json): nothing to resume or sample from.")
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["path"]
    except (ValueError, KeyError, TypeError) as exc:
        raise FlowkitError(f"{pointer} is not a checkpoint pointer ({type(exc).__name__}: {exc}); "
                           "point it at a step-* folder or start a new run.") from None
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise FlowkitError(f"{pointer} names {name!r}, which is not a step-* checkpoint folder.")
    path = directory / name
    if not path.is_dir():
        raise FlowkitError(f"{pointer} names {path.name}, which does not exist.")
    return path


def load_weights(path: Path, modules: dict[str, nn.Module], device: torch.device | str = "cpu") -> None:
    weights = load_file(str(path / "weights.safetensors"), device=str(device))
    for name, module in modules.items():
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise FlowkitError(
                f"checkpoint {path} does not fit the {name} this recipe builds: missing "
                f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}."
            )


def load_checkpoint(
    path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restores weights and optimizer; returns (trainer tensors, trainer state)."""
    load_weights(path, modules, device)
    meta = json.loads((path / "state.json").read_text())
    if optimizer is not None:
        tensors = load_file(str(path / "optimizer.safetensors"), device=str(device))
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    trainer_tensors = load_file(str(path / "trainer.safetensors"))
    return trainer_tensors, {"step": meta["step"], **meta["trainer"]}
