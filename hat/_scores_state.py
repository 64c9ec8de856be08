"""Where task-prediction statistics live in a model's state dict (``hat.task_prediction``), and the
``load_state_dict`` pre-hook that gives a model buffers of the shapes a state dict holds. Apart
so that ``hat.convert`` and ``hat.forget`` can use them without importing task prediction."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# buffers of the model itself: ``hat_task_scores_{t}_{term}_{what}``, ``hat_task_scores_{t}_classes``
# and ``hat_task_scores_config``
PREFIX = "hat_task_scores_"
CONFIG = PREFIX + "config"


def shape_from_state_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Before ``load_state_dict`` fills the model: buffers of the shapes the state dict holds (the
    statistics of whichever tasks it has, none kept from before), so that loading is an ordinary copy."""
    head = prefix + PREFIX
    for name in [n for n in module._buffers if n.startswith(PREFIX)]:
        del module._buffers[name]
    for key, value in state_dict.items():
        if key.startswith(head) and "." not in key[len(prefix):] and isinstance(value, torch.Tensor):
            module.register_buffer(key[len(prefix):], torch.empty_like(value))


def scored_tasks(model: nn.Module) -> list[int]:
    """The tasks whose statistics ``model`` holds (recorded by :func:`fit_task_scores`)."""
    root = unwrapped(model)
    return sorted(int(n[len(PREFIX):-len("_classes")]) for n in root._buffers
                  if n.startswith(PREFIX) and n.endswith("_classes"))


def drop(model: nn.Module, tasks: Iterable[int]) -> None:
    """Remove the statistics of ``tasks`` (``hat.forget_task``); with the last, the config."""
    root = unwrapped(model)
    for t in tasks:
        for name in [n for n in root._buffers if n.startswith(f"{PREFIX}{t}_")]:
            del root._buffers[name]
    if not scored_tasks(root):
        root._buffers.pop(CONFIG, None)


def install_load_hook(model: nn.Module) -> None:
    """Let ``model.load_state_dict`` bring task-prediction statistics into a model that has none yet
    (``hat.convert``, ``hat.timm_models`` and ``hat.app.experiment`` models have this already)."""
    root = unwrapped(model)
    if "_hat_scores_load_hook" not in root.__dict__:
        root.__dict__["_hat_scores_load_hook"] = root.register_load_state_dict_pre_hook(shape_from_state_dict).id


def unwrapped(model: nn.Module) -> nn.Module:
    """The model a wrapper (torch.compile, DataParallel, DDP) calls."""
    while True:
        inner = model.__dict__.get("_modules", {}).get("_orig_mod") or (
            model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else None)
        if inner is None:
            return model
        model = inner
