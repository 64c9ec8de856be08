"""Checkpoints of a ``hat-cl run``: model, optimizer and progress, written atomically.

A checkpoint is a folder ``checkpoint/`` holding ``model.safetensors`` (the state_dict),
``optimizer.safetensors`` (the optimizer's tensors, flattened) plus ``meta.json`` (the run's
settings, the tasks done, the accuracy matrix so far, the optimizer's non-tensor state and the
batch-order generator's state). It is written as ``checkpoint.new/`` and then swapped in, so a
reader never sees half a checkpoint and a crash leaves the previous one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or from a run with other settings."""


def save(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
         meta: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    final = folder / "checkpoint"
    staging = folder / "checkpoint.new"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(staging / "model.safetensors"))
    tensors, plain = _flatten_optimizer(optimizer.state_dict())
    tensors["generator_state"] = generator.get_state()
    save_file(tensors, str(staging / "optimizer.safetensors"))
    (staging / "meta.json").write_text(json.dumps({**meta, "format": FORMAT, "optimizer": plain}, indent=1) + "\n")
    old = folder / "checkpoint.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return final


def locate(path: Path) -> Path:
    """The checkpoint folder for ``--resume PATH``: PATH itself or PATH/checkpoint."""
    for candidate in (path / "checkpoint", path):
        if (candidate / "meta.json").is_file():
            return candidate
    raise CheckpointError(f"--resume {path}: no checkpoint there (looked for {path / 'checkpoint' / 'meta.json'} and "
                          f"{path / 'meta.json'}); write one with --checkpoint-every task --out DIR")


def read_meta(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"the checkpoint's meta.json in {folder} is unreadable: {err}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"the checkpoint in {folder} has format {meta.get('format')!r}; "
                              f"this version reads {FORMAT}")
    return meta


def load(folder: Path, meta: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
         generator: torch.Generator) -> None:
    """Load a checkpoint into freshly built objects; every file is read and checked before
    anything is loaded into them."""
    from safetensors.torch import load_file

    try:
        weights = load_file(str(folder / "model.safetensors"))
        tensors = load_file(str(folder / "optimizer.safetensors"))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for truncated or foreign files
        raise CheckpointError(f"the checkpoint in {folder} is corrupt or truncated: {err}") from None
    if "generator_state" not in tensors:
        raise CheckpointError(f"the checkpoint in {folder} is incomplete: no generator state")
    from hat._scores_state import PREFIX

    # task-prediction statistics (class-incremental runs) take the checkpoint's shapes when loaded
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(PREFIX)}
    kept = {k for k in weights if not k.startswith(PREFIX)}
    if set(own) != kept or any(own[k].shape != weights[k].shape for k in own):
        raise CheckpointError(f"the checkpoint in {folder} does not fit this model")
    model.load_state_dict(weights)
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    generator.set_state(tensors["generator_state"])


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, entries in plain["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": plain["param_groups"]}
