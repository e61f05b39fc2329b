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
Checkpoints of later steps than the one being saved belong to a trajectory that a resume from
an older checkpoint replaced (``--from-checkpoint``), and are removed too.

Durability: every file is fsynced before the rename that publishes its folder, and the parent
folder after it, so a power loss leaves either no new checkpoint or a complete one.
Integrity: ``state.json`` records the size and sha256 of every tensor file. Loading checks
them and the safetensors framing, and a damaged file is a `CheckpointError` naming it and the
intact checkpoint to resume from instead.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from flowkit.errors import FlowkitError
from flowkit.runs.rundir import fsync_path, write_json_atomic

KEEP = 2  # checkpoints kept on disk: the newest and the one before it
_NAME = re.compile(r"step-(\d+)(?:-(\d+))?")  # step-00001234, or step-00001234-1 for a re-save
WEIGHTS = "weights.safetensors"
LATEST = "latest.json"
STATE = "state.json"
_TENSOR_FILES = (WEIGHTS, "optimizer.safetensors", "trainer.safetensors")
_FILES = (*_TENSOR_FILES, STATE)


class CheckpointError(FlowkitError):
    """A checkpoint is missing, damaged (truncated, corrupted) or does not fit the recipe."""


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


def _digest(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file, as ``state.json`` records them."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}


def save_checkpoint(
    directory: Path, step: int, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
    trainer_tensors: dict[str, torch.Tensor], trainer_state: dict[str, Any],
) -> Path:
    """Writes checkpoint ``step`` atomically and prunes old ones; returns its folder."""
    if not directory.is_dir():
        directory.mkdir(parents=True)
        fsync_path(directory.parent)  # the new folder's own entry, too, must survive a power loss
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=".tmp-"))
    try:
        weights = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
        save_file(_tensors(weights), str(tmp / "weights.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(_tensors(trainer_tensors), str(tmp / "trainer.safetensors"))
        files = {name: _digest(tmp / name) for name in _TENSOR_FILES}
        with open(tmp / "state.json", "w", encoding="utf-8") as f:
            json.dump({"step": step, "trainer": trainer_state, "optimizer": opt_meta, "files": files}, f, indent=2)
        same_step = [(revision, path) for s, revision, path in _checkpoints(directory) if s == step]
        final = next((path for _, path in reversed(same_step) if _same_files(tmp, path)), None)
        if final is not None:  # already on disk, complete: nothing to replace
            shutil.rmtree(tmp)
        else:
            # Data first, then the folder's entries, and only then the rename that publishes
            # them: otherwise a power loss can leave a published folder of empty files.
            for name in _FILES:
                fsync_path(tmp / name)
            fsync_path(tmp)
            revision = same_step[-1][0] + 1 if same_step else 0
            final = directory / (f"step-{step:08d}" + (f"-{revision}" if revision else ""))
            os.replace(tmp, final)  # a fresh name: nothing that latest.json names is touched
            fsync_path(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(directory / LATEST, {"step": step, "path": final.name})
    _prune(directory, final, step)
    return final


def _prune(directory: Path, latest: Path, step: int) -> None:
    """Removes the superseded saves of ``step``, the checkpoints of later steps (a resume from
    an older checkpoint replaced them), all but the KEEP - 1 newest earlier steps, and stale
    temporaries; never ``latest``, the folder latest.json names."""
    found = _checkpoints(directory)
    superseded = [path for s, _, path in found if (s == step and path != latest) or s > step]
    earlier = [path for s, _, path in found if s < step]
    for path in superseded + earlier[: max(len(earlier) - (KEEP - 1), 0)]:
        # Renamed first, so that a crash while deleting never leaves a partial step-* folder.
        trash = Path(tempfile.mkdtemp(dir=directory, prefix=".tmp-"))
        os.replace(path, trash / path.name)
    for stale in directory.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in directory.glob(f".{LATEST}.*.tmp"):  # write_atomic's temporaries
        stale.unlink(missing_ok=True)


def has_checkpoint(directory: Path) -> bool:
    """Whether ``latest.json`` names a checkpoint in ``directory`` (a run to resume)."""
    return (directory / LATEST).is_file()


def latest_step(directory: Path) -> int | None:
    """The step of the checkpoint ``latest.json`` names, or None when there is none yet."""
    try:
        return int(json.loads((directory / LATEST).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_checkpoint(directory: Path) -> Path:
    """The folder ``latest.json`` names; a `CheckpointError` when it is missing, unreadable or dangling."""
    pointer = directory / LATEST
    if not pointer.is_file():
        raise CheckpointError(f"{directory} holds no checkpoint (no latest.json): nothing to resume or sample from.")
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["path"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{pointer} is not a checkpoint pointer ({type(exc).__name__}: {exc}). "
                              f"{_alternative(directory)}") from None
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CheckpointError(f"{pointer} names {name!r}, which is not a step-* checkpoint folder. "
                              f"{_alternative(directory)}")
    path = directory / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist. {_alternative(directory)}")
    return path


def checkpoint_to_resume(directory: Path, name: str | None = None) -> Path | None:
    """The checkpoint a resumed run starts from, or None when the run has none yet.

    ``name`` picks one (``--from-checkpoint``): a ``step-*`` folder's name, or ``step-N`` / ``N``
    for the newest save of step N. Otherwise the one ``latest.json`` names, or without
    latest.json the newest ``step-*`` folder: a crash can fall between publishing the first
    checkpoint and pointing latest.json at it, and a published folder is complete.
    """
    found = _checkpoints(directory) if directory.is_dir() else []
    if name is None:
        if (directory / LATEST).is_file():
            return latest_checkpoint(directory)
        return found[-1][2] if found else None
    match = re.fullmatch(r"(?:step-)?(\d+)(?:-(\d+))?", name.strip())
    if match:
        step, revision = int(match[1]), match[2]
        chosen = [path for s, r, path in found if s == step and (revision is None or r == int(revision))]
        if chosen:
            return chosen[-1]
    kept = ", ".join(path.name for _, _, path in found) or "none"
    raise CheckpointError(f"{directory} has no checkpoint {name!r} (--from-checkpoint takes a step-* folder name "
                          f"or step-N); the checkpoints kept are: {kept}.")


def _framing_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file's framing (an 8-byte little-endian header length,
    a JSON header, then exactly the data the header's offsets describe), or None."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"it is {size} bytes, too short for a safetensors header"
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            return f"its header claims {n} bytes but the file has only {size} (truncated)"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "its safetensors header is not readable JSON (corrupted)"
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return "its safetensors header is malformed (corrupted)"
    if 8 + n + end != size:
        return f"it is {size} bytes but its header describes {8 + n + end} (truncated or corrupted)"
    return None


def _damage(path: Path, names: tuple[str, ...]) -> tuple[str, str] | None:
    """(file, what is wrong with it) for the first damaged one of ``names`` and state.json, or
    None. Checkpoints written before state.json recorded digests get the framing check only."""
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "state.json", "it is missing"
    except (OSError, ValueError) as exc:
        return "state.json", f"it is not readable JSON ({type(exc).__name__}: {exc})"
    if not (isinstance(meta, dict) and isinstance(meta.get("step"), int) and isinstance(meta.get("trainer"), dict)
            and isinstance(meta.get("optimizer"), dict) and isinstance(meta.get("files", {}), dict)):
        return "state.json", "it lacks the step, trainer, optimizer or files entries a checkpoint records"
    recorded = meta.get("files", {})
    for name in names:
        file = path / name
        if not file.is_file():
            return name, "it is missing"
        want = recorded.get(name)
        if want is not None and not (isinstance(want, dict) and {"bytes", "sha256"} <= want.keys()):
            return "state.json", f"its entry for {name} is not a size and sha256"
        size = file.stat().st_size
        if want is not None and size != want["bytes"]:
            return name, f"it is {size} bytes, state.json records {want['bytes']} (truncated or overwritten)"
        problem = _framing_problem(file)
        if problem is not None:
            return name, problem
        if want is not None and _digest(file)["sha256"] != want["sha256"]:
            return name, "its sha256 differs from the one state.json records (corrupted)"
    return None


def _alternative(directory: Path, damaged: Path | None = None) -> str:
    """What to do instead of loading the checkpoint ``damaged`` in ``directory`` (or the one a
    broken latest.json should name): resume from the newest intact one kept, or start again."""
    run = directory.parent
    for _, _, other in reversed(_checkpoints(directory)):
        if other != damaged and _damage(other, _TENSOR_FILES) is None:
            return (f"The checkpoint {other.name} is intact: `flowkit run --resume {run} --from-checkpoint "
                    f"{other.name}` continues the run from it.")
    return (f"No intact checkpoint is left in {directory}: start the run again "
            f"(`flowkit run {run / 'recipe.toml'} --out NEW_DIR`).")


def verify_checkpoint(path: Path, names: tuple[str, ...] = _TENSOR_FILES) -> None:
    """Raises a `CheckpointError` naming the file when ``names`` or state.json in checkpoint
    folder ``path`` are missing, truncated or corrupted (safetensors framing, recorded size and
    sha256), and the intact checkpoint to resume from instead."""
    damage = _damage(path, names)
    if damage is not None:
        name, why = damage
        raise CheckpointError(f"{path / name} is damaged: {why}. {_alternative(path.parent, path)}")


def _load_file(file: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file), device=str(device))
    except SafetensorError as exc:  # damage the framing check cannot see (a bad dtype name, say)
        raise CheckpointError(f"{file} is damaged: {exc}. {_alternative(file.parent.parent, file.parent)}") from None


def read_weights(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The checkpoint's weights by state-dict key (``model.…``, ``dequantizer.…``, ``ema.…``),
    after checking the weights file."""
    verify_checkpoint(path, (WEIGHTS,))
    return _load_file(path / WEIGHTS, device)


def weights_sha256(path: Path) -> str | None:
    """The sha256 of the checkpoint's weights file, as its state.json records it: a checkpoint
    written again under the same name (a level trained again) has other weights."""
    files = json.loads((path / STATE).read_text(encoding="utf-8")).get("files", {})
    return files.get(WEIGHTS, {}).get("sha256")


def load_weights(path: Path, modules: dict[str, nn.Module], device: torch.device | str = "cpu") -> None:
    """Loads the checkpoint's weights into ``modules``, after checking the weights file."""
    weights = read_weights(path, device)
    for name, module in modules.items():
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        try:
            missing, unexpected = module.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # a tensor of another shape
            raise CheckpointError(f"checkpoint {path} does not fit the {name} this recipe builds: "
                                  f"{str(exc).strip().splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {path} does not fit the {name} this recipe builds: missing "
                f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}."
            )


def _state_in_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Each per-element state tensor (Adam's moments) in the memory layout of its parameter.

    safetensors stores tensors contiguous, so a channels-last weight's moments come back in the
    default layout. The fused optimiser kernels walk parameter, gradient and moments as flat
    memory and assume one layout: with moments in another, a resumed run paired each weight with
    another weight's moment (what once looked like results depending on where tensors lie). The
    element-wise (foreach) kernels are right either way, but slower on mixed layouts."""
    with torch.no_grad():
        for param, state in optimizer.state.items():
            for name, value in state.items():
                if (isinstance(value, torch.Tensor) and value.shape == param.shape
                        and value.stride() != param.stride()):
                    state[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def load_checkpoint(
    path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restores weights and optimizer, after checking every file; returns (trainer tensors, trainer state)."""
    verify_checkpoint(path)
    load_weights(path, modules, device)
    meta = json.loads((path / STATE).read_text(encoding="utf-8"))
    if optimizer is not None:
        tensors = _load_file(path / "optimizer.safetensors", device)
        try:
            optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        except (ValueError, KeyError) as exc:  # another number of parameter groups or sizes
            raise CheckpointError(f"checkpoint {path} does not fit the optimizer this recipe builds: {exc}") from None
        _state_in_parameter_layout(optimizer)
    trainer_tensors = _load_file(path / "trainer.safetensors", "cpu")
    return trainer_tensors, {"step": meta["step"], **meta["trainer"]}
