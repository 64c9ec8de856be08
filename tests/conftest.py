"""Shared fixtures: the digits data split into 2-class tasks, and a training loop on payloads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch
from hypothesis import settings

torch.set_num_threads(1)
settings.register_profile("hat", deadline=None, max_examples=30)
settings.load_profile("hat")


@pytest.fixture(scope="session")
def digit_tasks():
    """scikit-learn's bundled 8x8 digits as 2-class tasks (0/1, 2/3, 4/5, ...).

    Returns a list of (x_train, y_train, x_test, y_test) with x as [N, 1, 8, 8] floats in [0, 1]
    and y in {0, 1}.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    tasks = []
    for t in range(5):
        idx = ((y == 2 * t) | (y == 2 * t + 1)).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_train = int(0.7 * len(idx))
        tr, te = idx[:n_train], idx[n_train:]
        tasks.append((x[tr], y[tr] - 2 * t, x[te], y[te] - 2 * t))
    return tasks
