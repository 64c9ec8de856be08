"""Class-incremental learning: which task does a sample belong to, when no task id is given?

Each task's masked network is frozen once the task is trained, so what it computes for a sample is
a fixed fingerprint of that task. When a task ends, :func:`fit_task_scores` records statistics of
its training data (never samples): per class, the mean of the task's masked features (the outputs
of HAT layers under the task's hard masks, pooled over positions) and of the raw inputs; a
covariance of the features shared by the task's classes, and one of the input per class. A
sample's score for task ``t`` is minus its smallest Mahalanobis distance to task ``t``'s class
means, divided by how widely those distances spread on task ``t``'s own training data; the feature
and input terms are added. :func:`predict_task` gives each sample the best-scoring task,
:func:`predict` also the class within it (the task's head).

Scoring all tasks is one batched forward: the batch repeated once per task, with per-sample task
ids (``B x T`` samples), not one pass per task.

The statistics live in the model, as buffers ``hat_task_scores_*`` of the model itself, so they
are in ``model.state_dict()`` and follow ``model.to(device)``. A task's statistics are written
once, by its own ``fit_task_scores`` call (training later tasks never touches them), and
``hat.forget_task`` drops them with the task. A model built by ``hat.convert``, a
``hat.timm_models`` network or ``hat.app.experiment`` loads a state dict holding statistics as it
is; a fresh hand-built payload model needs ``hat.task_prediction.install_load_hook(model)`` once
before ``load_state_dict`` (a model that recorded statistics has it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from hat._scores_state import CONFIG, PREFIX, install_load_hook, scored_tasks, unwrapped
from hat.convert.trace import evaluating
from hat.errors import HATTypeError, HATValueError
from hat.modules._base import HATMasked
from hat.payload import HATPayload
from hat.protect.hooks import trained_tasks
from hat.tracking.tracked import task_modules
from hat.training import _call, _check_forward, _check_positive_int

__all__ = ["Prediction", "TaskPrediction", "fit_task_scores", "install_load_hook", "predict", "predict_task",
           "scored_tasks"]

#: default covariance shrinkage (a fraction of the mean variance added to the diagonal): the
#: masked features, and the raw inputs (whose near-constant border pixels need much more)
FEATURE_SHRINKAGE = 1e-3
INPUT_SHRINKAGE = 0.3
#: by default the layers nearest the output whose units add up to at most this many, and the
#: raw input when a sample has at most ``MAX_INPUT_VALUES`` values
MAX_FEATURES = 2048
MAX_INPUT_VALUES = 1024


class TaskPrediction(NamedTuple):
    """``task_id``: the predicted task per sample (``LongTensor[B]``); ``scores``: ``[B, T]``, the
    score of every task ``0..T-1`` (higher: fits better; ``-inf`` for a task not scored)."""

    task_id: torch.Tensor
    scores: torch.Tensor


class Prediction(NamedTuple):
    """``task_id`` and ``scores`` as :class:`TaskPrediction`; ``class_id``: the class within the
    predicted task (its head's argmax); ``global_class``: ``class_offsets[task_id] + class_id``;
    ``logits``: the predicted task's head output per sample ``[B, C]``."""

    task_id: torch.Tensor
    class_id: torch.Tensor
    global_class: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor


# -- the statistics ---------------------------------------------------------------------------------
# Buffers of the model itself (not a child module: nn.Sequential would call a child, and indexing
# it would change): ``hat_task_scores_{t}_{term}_{what}``, ``hat_task_scores_{t}_classes`` and
# ``hat_task_scores_config`` (the layers read and whether the input is a term, as JSON bytes).
_TERM_FIELDS = ("used", "means", "factor", "spread")


class _Gaussians(NamedTuple):
    """One term of one task: the values it reads (``used``, ``d`` of them), its class means over
    them ``[C, d]``, ``factor``: the lower Cholesky factor ``L`` of the precision (the inverse of
    the shrunk covariance, ``P = L L^T``), its lower triangle packed row by row, ``[K, d(d+1)/2]``
    with ``K`` 1 (one covariance shared by the classes) or ``C`` (one per class), and ``spread``:
    the standard deviation of the smallest squared distance over the task's own training samples."""

    used: torch.Tensor
    means: torch.Tensor
    factor: torch.Tensor
    spread: torch.Tensor

    def distances(self, f: torch.Tensor) -> torch.Tensor:
        """The smallest squared Mahalanobis distance of each row of ``f`` to a class mean:
        ``(f - m) P (f - m)^T = |(f - m) L|^2``, one ``[N, d] @ [d, d]`` per covariance."""
        f = f[:, self.used.to(f.device)].to(self.means.device, self.means.dtype)
        d = self.means.shape[1]
        rows, cols = torch.tril_indices(d, d, device=f.device)
        out = []
        for k in range(self.factor.shape[0]):
            factor = self.factor.new_zeros(d, d)
            factor[rows, cols] = self.factor[k]
            z, zm = f @ factor, self.means @ factor  # [N, d], [C, d]
            if self.factor.shape[0] == 1:  # shared: every class mean in this space
                out.append(((z.unsqueeze(1) - zm) ** 2).sum(-1))
            else:  # class k's own covariance: its own mean only
                out.append(((z - zm[k]) ** 2).sum(-1, keepdim=True))
        return torch.cat(out, 1).amin(1)

    def score(self, f: torch.Tensor) -> torch.Tensor:
        return -self.distances(f) / self.spread


class _Config(NamedTuple):
    layers: list[str]
    inputs: bool


def _read_config(root: nn.Module) -> _Config | None:
    raw = root._buffers.get(CONFIG)
    if raw is None:
        return None
    state = json.loads(bytes(raw.cpu().tolist()).decode())
    return _Config(list(state["layers"]), bool(state["inputs"]))


def _write_config(root: nn.Module, config: _Config) -> None:
    raw = json.dumps({"layers": config.layers, "inputs": config.inputs, "version": 1}).encode()
    root.register_buffer(CONFIG, torch.tensor(list(raw), dtype=torch.uint8))


def _terms(root: nn.Module, t: int) -> list[_Gaussians]:
    out, i = [], 0
    while f"{PREFIX}{t}_{i}_used" in root._buffers:
        out.append(_Gaussians(*(root._buffers[f"{PREFIX}{t}_{i}_{n}"] for n in _TERM_FIELDS)))
        i += 1
    return out


def _store(root: nn.Module, t: int, terms: list[_Gaussians], classes: torch.Tensor) -> None:
    for name in [n for n in root._buffers if n.startswith(f"{PREFIX}{t}_")]:  # replace=True
        del root._buffers[name]
    for i, g in enumerate(terms):
        for n in _TERM_FIELDS:
            root.register_buffer(f"{PREFIX}{t}_{i}_{n}", getattr(g, n))
    root.register_buffer(f"{PREFIX}{t}_classes", classes)


# -- fitting ----------------------------------------------------------------------------------------
@torch.no_grad()
def fit_task_scores(model: nn.Module, task_id: Any, data: Any, *, forward: Any = None, layers: Any = None,
                    inputs: Any = None, batch_size: int = 1024, shrinkage: float = FEATURE_SHRINKAGE,
                    input_shrinkage: float = INPUT_SHRINKAGE, replace: bool = False) -> None:
    """Record what predicting task ``task_id`` needs, from its training data, once it is trained.

    ``data``: ``(x, y)`` tensors (run in batches of ``batch_size``) or a re-iterable of ``(x, y)``
    batches (a ``DataLoader``; it is read twice), ``y`` the class within the task. Nothing is
    kept of the samples: per class a mean; for the features one covariance shared by the task's
    classes, for the raw input one per class (both shrunk towards their mean variance by
    ``shrinkage`` and ``input_shrinkage``, kept as a packed Cholesky factor of their inverse); and
    the spread of the task's own distances. ``layers``: names of the modules whose outputs are the
    features (default: the HAT layers nearest the output with at most 2048 units in all);
    ``inputs``: whether the raw input is a term too (default: when a sample has at most 1024
    values). Both are fixed by the first task fitted. ``forward``: how the model is called, as in
    ``hat.training`` (``"payload"``, ``"set_task"`` or a callable; default: ``"payload"`` for
    models that take payloads, else ``"set_task"``).

    A task whose statistics are recorded keeps them: fitting it again needs ``replace=True``.
    """
    model = _check_model(model)
    from hat.forget import check_trained_task

    t = check_trained_task(model, task_id)
    forward = _resolve_forward(model, forward)
    _check_positive_int(batch_size, "batch_size")
    for name, value in (("shrinkage", shrinkage), ("input_shrinkage", input_shrinkage)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
            raise HATValueError(f"{name} must be a positive float; got {value!r}")
    if not isinstance(replace, bool):
        raise HATTypeError(f"replace must be True or False; got {replace!r}")
    existing = _read_config(model) if scored_tasks(model) else None
    if t in scored_tasks(model) and not replace:
        raise HATValueError(f"task {t} already has recorded statistics (hat.fit_task_scores); they stay as "
                            "recorded, like the task's weights; pass replace=True to record them again")
    batches = _batches(data, batch_size)
    first = next(iter(batches), None)
    if first is None or not isinstance(first[0], torch.Tensor) or len(first[0]) == 0:
        raise HATValueError("data has no samples to fit task scores on (its first batch is empty)")
    layer_names, use_inputs = _choose(model, existing, layers, inputs, first[0], forward)

    masked = _masked_layers(model, layer_names)
    sums = _Sums(([False] if layer_names else []) + ([True] if use_inputs else []))
    seen = 0
    for x, y in batches:
        seen += len(x)
        if len(x) == 0:
            continue
        feats = _features(model, forward, x, [t], layer_names, use_inputs, masked)
        sums.add([f[0] for f in feats], _labels(y, x))
    if seen == 0:
        raise HATValueError("data has no samples to fit task scores on")
    gaussians, classes = sums.fit(([shrinkage] if layer_names else []) + ([input_shrinkage] if use_inputs else []))
    spreads: list[list[torch.Tensor]] = [[] for _ in gaussians]
    for x, _ in batches:
        if len(x) == 0:
            continue
        feats = _features(model, forward, x, [t], layer_names, use_inputs, masked)
        for i, g in enumerate(gaussians):
            spreads[i].append(g.distances(feats[i][0]))
    for g, d in zip(gaussians, spreads):
        spread = torch.cat(d).std()
        g.spread.copy_(spread if spread > 0 else torch.ones_like(spread))
    install_load_hook(model)
    if existing is None:
        _write_config(model, _Config(list(layer_names), use_inputs))
    _store(model, t, gaussians, classes)


class _Sums:
    """Running per-class counts and sums and sums of outer products (per class for a term with
    per-class covariances, else one), in float64."""

    def __init__(self, per_class: list[bool]) -> None:
        self.per_class = per_class
        self.count: dict[int, int] = {}
        self.sum: list[dict[int, torch.Tensor]] = [{} for _ in per_class]
        self.outer: list[dict[int, torch.Tensor]] = [{} for _ in per_class]
        self.nonzero: list[torch.Tensor | None] = [None for _ in per_class]

    def add(self, feats: list[torch.Tensor], y: torch.Tensor) -> None:
        y = y.to(feats[0].device)
        labels = y.unique().tolist()
        for c in labels:
            self.count[c] = self.count.get(c, 0) + int((y == c).sum())
        for i, f in enumerate(feats):
            f = f.double()
            nz = (f != 0).any(0)
            self.nonzero[i] = nz if self.nonzero[i] is None else self.nonzero[i] | nz
            for c in labels:
                fc = f[y == c]
                self.sum[i][c] = self.sum[i][c] + fc.sum(0) if c in self.sum[i] else fc.sum(0)
                key = c if self.per_class[i] else -1
                outer = fc.T @ fc
                self.outer[i][key] = self.outer[i][key] + outer if key in self.outer[i] else outer

    def fit(self, shrinkages: list[float]) -> tuple[list[_Gaussians], torch.Tensor]:
        classes = sorted(self.count)
        n = torch.tensor([self.count[c] for c in classes], dtype=torch.float64)
        out = []
        for i, shrink in enumerate(shrinkages):
            used = self.nonzero[i]
            if not bool(used.any()):
                raise HATValueError(f"every value of term {i} is zero on the task's data: the layers read have "
                                    "no unit on for this task; choose other layers")
            nn_ = n.to(used.device)
            m = (torch.stack([self.sum[i][c] for c in classes]) / nn_.unsqueeze(1))[:, used]
            if self.per_class[i]:
                covs = [(self.outer[i][c][used][:, used] - n[j] * torch.outer(m[j], m[j])) / max(float(n[j]) - 1, 1.0)
                        for j, c in enumerate(classes)]
            else:
                scatter = self.outer[i][-1][used][:, used] - (m.T * nn_) @ m
                covs = [scatter / max(float(n.sum()) - len(classes), 1.0)]
            d = m.shape[1]
            rows, cols = torch.tril_indices(d, d, device=m.device)
            eye = torch.eye(d, dtype=m.dtype, device=m.device)
            factors = []
            for cov in covs:
                cov = cov + shrink * cov.diagonal().mean().clamp_min(1e-12) * eye
                precision = torch.cholesky_inverse(torch.linalg.cholesky(cov))
                factor = torch.linalg.cholesky((precision + precision.T) / 2)
                factors.append(factor[rows, cols])
            out.append(_Gaussians(used.clone(), m.float(), torch.stack(factors).float(),
                                  torch.ones((), dtype=torch.float32, device=used.device)))
        return out, torch.tensor(classes, dtype=torch.long, device=used.device)


# -- prediction -------------------------------------------------------------------------------------
@torch.no_grad()
def predict_task(model: nn.Module, x: Any, *, tasks: Any = None, forward: Any = None,
                 batch_size: int | None = None) -> TaskPrediction:
    """The task each sample of ``x`` most likely belongs to (no task id given), and every task's
    score: one forward of the batch repeated once per scored task, with per-sample task ids and
    the hard masks, in eval mode (the model's mode is restored after). ``tasks``: the tasks to
    choose among (default: every trained task; each needs :func:`fit_task_scores` first).
    ``batch_size``: at most this many samples of ``x`` per forward (each forward runs
    ``batch_size x len(tasks)``)."""
    pred = _run(model, x, tasks, forward, batch_size, logits=False)
    return TaskPrediction(pred.task_id, pred.scores)


@torch.no_grad()
def predict(model: nn.Module, x: Any, *, class_offsets: Any = None, tasks: Any = None, forward: Any = None,
            batch_size: int | None = None) -> Prediction:
    """:func:`predict_task`, then the class within the predicted task (its head's choice) and the
    global class ``class_offsets[task] + class``. ``class_offsets``: one int per task (default:
    ``t * C`` for a head of ``C`` outputs, tasks taking consecutive classes)."""
    return _run(model, x, tasks, forward, batch_size, logits=True, class_offsets=class_offsets)


def _run(model: nn.Module, x: Any, tasks: Any, forward: Any, batch_size: Any, *, logits: bool,
         class_offsets: Any = None) -> Prediction:
    model = _check_model(model)
    if not isinstance(x, torch.Tensor):
        raise HATTypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise HATValueError(f"x must be a batch with at least one sample (shape [B, ...]); got shape {tuple(x.shape)}")
    forward = _resolve_forward(model, forward)
    if batch_size is not None:
        _check_positive_int(batch_size, "batch_size")
    chosen = _check_tasks(model, tasks)
    config = _read_config(model)
    num = max(chosen) + 1
    offsets = _check_offsets(class_offsets, num) if logits else None
    masked = _masked_layers(model, config.layers)
    parts = x.split(batch_size) if batch_size is not None else (x,)
    all_scores, all_logits = [], []
    for part in parts:
        feats, out = _features(model, forward, part, chosen, config.layers, config.inputs, masked,
                               with_output=True)
        s = torch.full((len(part), num), -math.inf, device=part.device)
        for k, t in enumerate(chosen):
            terms = _terms(model, t)
            s[:, t] = sum(g.score(feats[i][k]) for i, g in enumerate(terms)).to(s.device)
        all_scores.append(s)
        if logits:
            all_logits.append(out)
    scores = torch.cat(all_scores)
    task_id = scores.argmax(1)
    if not logits:
        return Prediction(task_id, task_id, task_id, scores, scores)
    out = torch.cat(all_logits, 1)  # [T, B, C]
    position = torch.zeros(num, dtype=torch.long)
    position[chosen] = torch.arange(len(chosen))
    rows = position[task_id.cpu()].to(out.device)
    chosen_logits = out[rows, torch.arange(len(task_id), device=out.device)]
    class_id = chosen_logits.argmax(-1)
    if offsets is None:
        offsets = [t * out.shape[-1] for t in range(num)]
    global_class = torch.tensor(offsets, device=class_id.device)[task_id.to(class_id.device)] + class_id
    return Prediction(task_id, class_id, global_class, scores, chosen_logits)


# -- reading features -------------------------------------------------------------------------------
def _features(model: nn.Module, forward: Any, x: torch.Tensor, tasks: list[int], layers: Sequence[str],
              inputs: bool, masked: dict[str, HATMasked | None], with_output: bool = False) -> Any:
    """Per term, ``[len(tasks), B, values]``: the layers' outputs under each task's hard masks
    (pooled over every dimension but the units), side by side, then the flattened input if ``inputs``."""
    n, b = len(tasks), x.shape[0]
    ids = torch.arange(n, device=x.device).repeat_interleave(b)
    ids = torch.tensor(tasks, device=x.device)[ids]
    xx = x.unsqueeze(0).expand(n, *x.shape).reshape(n * b, *x.shape[1:])
    seen: dict[str, torch.Tensor] = {}
    handles = []
    named = dict(model.named_modules())
    for name in layers:
        handles.append(named[name].register_forward_hook(_keeper(name, seen)))
    try:
        with evaluating(model):
            out = _call(model, forward, xx, ids if n > 1 else tasks[0], None)  # hard masks
    finally:
        for h in handles:
            h.remove()
    feats = []
    for name in layers:
        if name not in seen:
            raise HATValueError(f"layer {name!r} was not called by the model's forward; choose layers it runs")
        f = _pool(seen[name], masked[name])
        if f.shape[0] != n * b:
            raise HATValueError(f"layer {name!r} gave {f.shape[0]} rows for {n * b} samples; choose layers whose "
                                "output has one row per sample")
        f = f.reshape(n, b, -1)
        layer = masked[name]
        if layer is not None:  # the task's hard mask (a norm after the layer may apply it for the layer)
            mask = torch.stack([layer.get_mask(t) for t in tasks]).to(f.dtype)
            f = f * mask.unsqueeze(1)
        feats.append(f.float())
    feats = [torch.cat(feats, -1)] if feats else []
    if inputs:
        feats.append(x.reshape(b, -1).float().unsqueeze(0).expand(n, b, -1))
    if with_output:
        return feats, out.reshape(n, b, -1)
    return feats


def _keeper(name: str, seen: dict[str, torch.Tensor]) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        seen[name] = output.data if isinstance(output, HATPayload) else output
    return hook


def _pool(y: Any, layer: HATMasked | None) -> torch.Tensor:
    """``[N, units]``: the mean over every dimension but the batch and the units."""
    if not isinstance(y, torch.Tensor):
        raise HATTypeError(f"a scored layer must return a tensor (or a payload); got {type(y).__name__}")
    if y.dim() <= 2:
        return y.reshape(y.shape[0], -1)
    dim = layer.mask_dim if layer is not None else 1
    dim = dim % y.dim()
    y = y.movedim(dim, -1)
    return y.reshape(y.shape[0], -1, y.shape[-1]).mean(1)


# -- choices and checks -----------------------------------------------------------------------------
def _choose(model: nn.Module, existing: _Config | None, layers: Any, inputs: Any, x: torch.Tensor,
            forward: Any) -> tuple[list[str], bool]:
    named = dict(model.named_modules())
    if layers is not None:
        if isinstance(layers, str) or not isinstance(layers, Sequence) or not all(isinstance(n, str) for n in layers):
            raise HATTypeError(f"layers must be a list of module names; got {layers!r}")
        missing = [n for n in layers if n not in named or not n]
        if missing:
            raise HATValueError(f"layers must name modules of the model (see model.named_modules()); got {missing}")
        layers = list(layers)
    if inputs is not None and not isinstance(inputs, bool):
        raise HATTypeError(f"inputs must be True, False or None; got {inputs!r}")
    if existing is not None:
        if (layers is not None and layers != existing.layers) or (inputs is not None and inputs != existing.inputs):
            raise HATValueError(f"the model's recorded tasks read layers={existing.layers}, inputs={existing.inputs}; "
                                f"every task must read the same (got layers={layers}, inputs={inputs})")
        return list(existing.layers), existing.inputs
    if inputs is None:
        inputs = x[0].numel() <= MAX_INPUT_VALUES
    if layers is None:
        layers = _default_layers(model, x, forward)
    if not layers and not inputs:
        raise HATValueError("task scores need at least one term: give layers or inputs=True")
    return layers, inputs


def _default_layers(model: nn.Module, x: torch.Tensor, forward: Any) -> list[str]:
    """The HAT layers nearest the output (in the order the forward calls them) whose units add up
    to at most ``MAX_FEATURES``; at least the last one."""
    names = {id(m): n for n, m in model.named_modules()}
    order: list[str] = []
    handles = [m.register_forward_hook(lambda m, a, o: order.append(names[id(m)]))
               for m in model.modules() if isinstance(m, HATMasked)]
    try:
        with evaluating(model), torch.no_grad():
            _call(model, forward, x[:1], trained_tasks(model)[0], None)
    finally:
        for h in handles:
            h.remove()
    units = {n: m.task_embedding.shape[1] for n, m in model.named_modules() if isinstance(m, HATMasked)}
    chosen: list[str] = []
    total = 0
    for n in reversed(list(dict.fromkeys(order))):
        if chosen and total + units[n] > MAX_FEATURES:
            break
        chosen.insert(0, n)
        total += units[n]
    return chosen


def _masked_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, HATMasked | None]:
    named = dict(model.named_modules())
    missing = [n for n in layers if n not in named]
    if missing:
        raise HATValueError(f"the recorded task scores read layers {missing}, which the model does not have")
    return {n: named[n] if isinstance(named[n], HATMasked) else None for n in layers}


def _check_tasks(model: nn.Module, tasks: Any) -> list[int]:
    trained = trained_tasks(model)
    if not trained:
        raise HATValueError("the model has no trained task to predict; train one (hat.training.train_task, or "
                            "hat.mark_trained after your own loop) and record its statistics with "
                            "hat.fit_task_scores(model, task_id, data)")
    if tasks is None:
        chosen = trained
    else:
        if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Iterable):
            raise HATTypeError(f"tasks must be a list of trained task ids or None; got {tasks!r}")
        chosen = []
        for t in tasks:
            if isinstance(t, bool) or not isinstance(t, int):
                raise HATTypeError(f"tasks must hold ints; got {t!r}")
            if t not in trained:
                raise HATValueError(f"tasks must hold trained tasks {trained}; got {t}")
            chosen.append(t)
        if not chosen:
            raise HATValueError("tasks must name at least one trained task; got an empty list")
        chosen = sorted(set(chosen))
    have = set(scored_tasks(model))
    for t in chosen:
        if t not in have:
            raise HATValueError(f"task {t} has no recorded statistics for task prediction; call "
                                f"hat.fit_task_scores(model, {t}, its training data) once it is trained")
    return chosen


def _check_offsets(offsets: Any, num: int) -> list[int] | None:
    if offsets is None:
        return None
    if isinstance(offsets, torch.Tensor):
        offsets = offsets.tolist()
    if isinstance(offsets, (str, bytes)) or not isinstance(offsets, Sequence) or \
            not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets):
        raise HATTypeError(f"class_offsets must be a list of ints, one per task; got {offsets!r}")
    if len(offsets) < num:
        raise HATValueError(f"class_offsets must hold one int per task (at least {num}); got {len(offsets)}")
    return list(offsets)


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise HATTypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    root = unwrapped(model)
    if not task_modules(root):
        raise HATValueError(f"{type(root).__name__} has no HAT or task-indexed module: it has no tasks to predict")
    return root


def _resolve_forward(model: nn.Module, forward: Any) -> Any:
    if forward is None:
        takes = getattr(type(model), "_hat_takes_payload", False) or "_hat_plain_heads" not in model.__dict__
        return "payload" if takes else "set_task"
    _check_forward(forward)
    return forward


def _labels(y: Any, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise HATTypeError(f"labels must be an integer tensor; got {getattr(y, 'dtype', type(y).__name__)}")
    if y.shape != (x.shape[0],):
        raise HATValueError(f"labels must be [batch] = [{x.shape[0]}]; got shape {tuple(y.shape)}")
    return y.long()


class _Batches:
    def __init__(self, x: torch.Tensor, y: torch.Tensor, size: int) -> None:
        self.x, self.y, self.size = x, y, size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return zip(self.x.split(self.size), self.y.split(self.size))


def _batches(data: Any, batch_size: int) -> Iterable[Any]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, torch.Tensor) for d in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise HATValueError(f"data's x and y must hold the same number of samples; got {x.shape[0]} and "
                                f"{y.shape[0]}")
        return _Batches(x, y, batch_size)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, torch.Tensor)):
        if iter(data) is data:
            raise HATTypeError("data must be (x, y) tensors or a re-iterable of (x, y) batches (a DataLoader; it is "
                               f"read twice); got a one-shot iterator ({type(data).__name__})")
        return data
    raise HATTypeError(f"data must be (x, y) tensors or an iterable of (x, y) batches; got {type(data).__name__}")
