"""Checkpoints without pickle: weights and optimizer tensors in safetensors, the rest in JSON.

Layout: ``checkpoints/step-00001234/{weights,optimizer,trainer}.safetensors`` plus
``state.json``, and ``checkpoints/latest.json`` naming the newest complete one. A checkpoint is
written to a temporary folder and renamed into place (atomic on POSIX), and ``latest.json`` is
replaced atomically afterwards, so a crash never leaves a half-written checkpoint as latest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flowkit.errors import FlowkitError

KEEP = 2  # checkpoints kept on disk: the newest and the one before it


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def save_checkpoint(
    directory: Path, step: int, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
    trainer_tensors: dict[str, torch.Tensor], trainer_state: dict[str, Any],
) -> Path:
    """Writes checkpoint ``step`` atomically and prunes old ones; returns its folder."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=".tmp-"))
    try:
        weights = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
        save_file(_tensors(weights), str(tmp / "weights.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(_tensors(trainer_tensors), str(tmp / "trainer.safetensors"))
        with open(tmp / "state.json", "w", encoding="utf-8") as f:
            json.dump({"step": step, "trainer": trainer_state, "optimizer": opt_meta}, f, indent=2)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(directory / "latest.json", {"step": step, "path": final.name})
    for old in sorted(directory.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path) -> Path:
    pointer = directory / "latest.json"
    if not pointer.is_file():
        raise FlowkitError(f"{directory} holds no checkpoint (no latest.json): nothing to resume or sample from.")
    path = directory / json.loads(pointer.read_text())["path"]
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
