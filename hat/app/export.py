"""``hat-cl run --export DIR``: one pruned plain model per trained task, as ``torch.export``
archives that load and run with torch alone (``torch.export.load(path).module()(x)``: no hat,
no timm), and the parameters/FLOPs table of ``hat.prune_report``.

The archive was chosen over weights plus an architecture description: a pruned model has odd
layer widths (and, for timm networks, timm's classes), and an exported program carries its
graph with its weights, so the user needs nothing but torch to run it. The batch size is left
dynamic.

The CLI's own ``mlp`` and ``cnn`` are hat-cl style networks on payloads, which ``hat.prune``
does not follow; they are first rebuilt as the same network of plain layers converted with
``hat.convert`` (same weights, masks and trained tasks), checked to give the same outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hat
from hat.app.experiment import CNN, MLP, Task
from hat.errors import HATError

__all__ = ["export_tasks", "format_export", "tensor_model"]


def _plain_twin(model: nn.Module) -> tuple[nn.Sequential, dict[str, str]] | None:
    """The CLI network ``model`` as plain layers in one nn.Sequential, and the renaming of its
    state-dict prefixes; None for other models."""
    if isinstance(model, MLP):
        fc1, fc2, head = model.fc1, model.fc2, model.head
        seq = nn.Sequential(nn.Flatten(), nn.Linear(fc1.in_features, fc1.out_features), nn.ReLU(),
                            nn.Linear(fc2.in_features, fc2.out_features), nn.ReLU(),
                            nn.Linear(head.in_features, head.out_features))
        return seq, {"fc1.": "1.", "fc2.": "3.", "head.": "5."}
    if isinstance(model, CNN):
        c1, c2, fc, head = model.conv1, model.conv2, model.fc, model.head
        seq = nn.Sequential(nn.Conv2d(c1.in_channels, c1.out_channels, c1.kernel_size, padding=c1.padding),
                            nn.BatchNorm2d(c1.out_channels), nn.ReLU(),
                            nn.Conv2d(c2.in_channels, c2.out_channels, c2.kernel_size, padding=c2.padding),
                            nn.BatchNorm2d(c2.out_channels), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                            nn.Linear(fc.in_features, fc.out_features), nn.ReLU(),
                            nn.Linear(head.in_features, head.out_features))
        return seq, {"conv1.": "0.", "bn1.": "1.", "conv2.": "3.", "bn2.": "4.", "fc.": "8.", "head.": "10."}
    return None


def tensor_model(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``model`` itself when its forward takes tensors; the CLI's payload ``mlp``/``cnn`` rebuilt
    as converted plain layers (weights, masks, norms' rows, heads and trained tasks loaded), its
    outputs checked equal to the payload network's for every trained task."""
    twin = _plain_twin(model)
    if twin is None:
        return model
    seq, renames = twin
    num_tasks = model.head.num_tasks
    hat.convert(seq, hat.HATConfig(num_tasks=num_tasks))
    seq.eval()
    with torch.no_grad():
        seq(example)  # the first call places the masks (the conv's goes to the BatchNorm after it)
    state = {}
    for key, value in model.state_dict().items():
        prefix = next(p for p in renames if key.startswith(p))
        state[renames[prefix] + key[len(prefix):]] = value
    seq.load_state_dict(state)
    was = model.training
    model.eval()
    try:
        for t in hat.trained_tasks(model):
            with torch.no_grad(), hat.task(seq, t):
                got = seq(example)
                want = model(hat.HATPayload(example, task_id=t)).data
            if not torch.allclose(got, want, rtol=0, atol=1e-5 * max(float(want.abs().max()), 1e-3)):
                raise HATError(f"export: the plain twin of {type(model).__name__} differs from it on task {t}")
    finally:
        model.train(was)
    return seq


def export_tasks(model: nn.Module, tasks: list[Task], folder: Path) -> list[dict[str, Any]]:
    """Prune ``model`` for each trained task, write ``folder/task_<t>.pt2`` and
    ``folder/export.json``, and return the table's rows."""
    folder.mkdir(parents=True, exist_ok=True)
    example = tasks[0][2][:2]
    follow = tensor_model(model, example)
    rows = []
    for t in hat.trained_tasks(model):
        x = tasks[t][2][:2]
        report = hat.prune_report(follow, t, x)[0]
        pruned = hat.prune(follow, t, x).eval()
        program = torch.export.export(pruned, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        path = folder / f"task_{t}.pt2"
        torch.export.save(program, path)
        rows.append({"task": t, "file": path.name, "params": report.params, "params_pruned": report.params_pruned,
                     "flops": report.flops, "flops_pruned": report.flops_pruned,
                     "max_abs_diff": report.max_abs_diff, "example_shape": list(x.shape)})
    (folder / "export.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def format_export(rows: list[dict[str, Any]], folder: Path | str) -> str:
    """The params/FLOPs table printed after an export."""
    lines = [f"Exported pruned models to {folder} (torch.export.load(path).module() runs them with torch alone):",
             "  task  file        params full -> pruned        FLOPs/sample full -> pruned    max |diff|"]
    for r in rows:
        per = r["example_shape"][0]  # FLOPs were counted on this many samples
        lines.append(f"  {r['task']:>4}  {r['file']:<10}  {r['params']:>10,} -> {r['params_pruned']:>10,} "
                     f"({100 * r['params_pruned'] / r['params']:5.1f} %)  "
                     f"{r['flops'] / per / 1e6:8.2f}M -> {r['flops_pruned'] / per / 1e6:8.2f}M "
                     f"({100 * r['flops_pruned'] / max(r['flops'], 1):5.1f} %)  {r['max_abs_diff']:.1e}")
    return "\n".join(lines)
