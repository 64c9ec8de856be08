"""A plain training loop over payloads, as a hat-cl user writes it."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

import hat
from hat import HATPayload
from hat.utils import get_hat_mask_scale, get_hat_reg_term


def train_task(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               task_id: int, *, epochs: int = 5, batch_size: int = 32, s_max: float = 100.0,
               reg: float = 0.75, set_to_none: bool = True, seed: int = 0,
               forward: Callable | None = None) -> None:
    """Train ``task_id`` with the paper's per-epoch linear scale annealing and the mask regularizer."""
    forward = forward or (lambda m, p: m(p).data)
    g = torch.Generator().manual_seed(seed + (task_id or 0))
    model.train()
    n_batches = (len(x) + batch_size - 1) // batch_size
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for b in range(n_batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            scale = get_hat_mask_scale("linear", s_max, b / max(n_batches - 1, 1))
            logits = forward(model, HATPayload(x[idx], task_id=task_id, mask_scale=scale))
            loss = F.cross_entropy(logits, y[idx])
            if reg:
                loss = loss + reg * get_hat_reg_term(model, task_id=task_id, mask_scale=scale)
            optimizer.zero_grad(set_to_none=set_to_none)
            loss.backward()
            optimizer.step()


@torch.no_grad()
def eval_logits(model: torch.nn.Module, x: torch.Tensor, task_id: int | None,
                forward: Callable | None = None) -> torch.Tensor:
    """Hard-mask eval-mode logits of ``task_id``."""
    forward = forward or (lambda m, p: m(p).data)
    was_training = model.training
    model.eval()
    out = forward(model, HATPayload(x, task_id=task_id))
    model.train(was_training)
    return out


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def tensor_forward(model: torch.nn.Module, payload: HATPayload) -> torch.Tensor:
    """``forward`` for a converted model: the payload's task as model state, its data as a tensor."""
    hat.set_task(model, payload.task_id, mask_scale=payload.mask_scale)
    return model(payload.data)
