"""What every HAT timm model shares: the payload entry point, weight-decay exclusions, a
task-indexed classifier after ``reset_classifier``, and checkpoint checks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import hat
from hat.errors import HATTypeError, HATValueError
from hat.modules import TaskIndexedLinear
from hat.modules._base import HATMasked
from hat.payload import HATPayload
from hat.tracking.tracked import TaskTracked, check_config


def require_config(name: str, hat_config: Any) -> Any:
    if hat_config is None:
        raise HATTypeError(f"{name} needs a hat_config: timm.create_model({name!r}, "
                           "hat_config=hat.HATConfig(num_tasks=...), "
                           "...)")
    return check_config(hat_config)


class HATTimmModel:
    """Mixed into timm's model class after conversion (the instance's class is swapped for a
    subclass that adds only methods: every timm method and attribute keeps working).

    - ``model(HATPayload(x, task_id=t, mask_scale=s))`` selects the task (``hat.set_task``, kept
      after the call so that gradient checkpointing recomputes with it) and returns a payload;
      ``model(x)`` with a tensor uses the task selected by ``hat.set_task`` / ``hat.task``.
    - ``no_weight_decay()`` names the task embeddings and the task-indexed norm and bias rows.
    - ``reset_classifier(n)`` gives a task-indexed head again.
    """

    _hat_takes_payload = True
    hat_config: Any

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(x, HATPayload):
            hat.set_task(self, x.task_id, x.mask_scale)
            out = super().forward(x.data, *args, **kwargs)  # type: ignore[misc]
            return HATPayload(out, task_id=x.task_id, mask_scale=x.mask_scale)
        return super().forward(x, *args, **kwargs)  # type: ignore[misc]

    def no_weight_decay(self) -> set[str]:
        base = getattr(super(), "no_weight_decay", None)
        names = set(base()) if callable(base) else set()
        for module_name, module in self.named_modules():  # type: ignore[attr-defined]
            if not isinstance(module, TaskTracked):
                continue
            prefix = f"{module_name}." if module_name else ""
            if isinstance(module, HATMasked):
                names.add(prefix + "task_embedding")
            elif isinstance(module, TaskIndexedLinear):
                names.add(prefix + "bias")  # a bias: excluded as in the plain model
            else:
                names.update(prefix + n for n in module._hat_row_params)  # norms, embeddings: 1-d per task
        return names

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        super().reset_classifier(num_classes, *args, **kwargs)  # type: ignore[misc]
        name = (self.pretrained_cfg.get("classifier") if isinstance(getattr(self, "pretrained_cfg", None), dict)
                else None)
        head = self.get_submodule(name) if name else None  # type: ignore[attr-defined]
        if type(head) is nn.Linear:
            parent, _, attr = name.rpartition(".")
            new = TaskIndexedLinear.from_base_module(head, hat_config=self.hat_config)
            setattr(self.get_submodule(parent) if parent else self, attr, new)  # type: ignore[attr-defined]


def finish(model: nn.Module, cls: type, hat_config: Any, mapping: dict | None = None) -> nn.Module:
    """Convert a plain timm model built by timm and give it the HAT methods."""
    hat.convert(model, hat_config, mapping=mapping)
    model.hat_config = hat_config
    if not isinstance(model, cls):
        model.__class__ = cls
    return model


def key_check(name: str, allowed_missing: tuple[str, ...] = ()) -> Any:
    """A pretrained filter (``(state_dict, model) -> state_dict``) that fails clearly when the
    checkpoint is not of ``model``'s architecture, naming the first mismatching keys."""

    def check(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        own = model.state_dict()
        classifier = (model.pretrained_cfg.get("classifier", "")
                      if isinstance(getattr(model, "pretrained_cfg", None), dict) else "")
        heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        is_head = lambda k: any(h and k.startswith(h + ".") for h in heads)  # noqa: E731
        missing = [k for k in own if k not in state_dict and not k.endswith(allowed_missing)]
        unexpected = [k for k in state_dict if k not in own]
        shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in state_dict and not is_head(k) and state_dict[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append("missing " + ", ".join(missing[:5]))
            if unexpected:
                parts.append("unexpected " + ", ".join(unexpected[:5]))
            if shapes:
                parts.append("shape " + ", ".join(shapes[:5]))
            raise HATValueError(f"the pretrained checkpoint does not fit {name}: " + "; ".join(parts))
        return state_dict

    return check


def plain_cfg(tagged: str) -> dict[str, Any]:
    """timm's own pretrained config of a plain model, pointing at the plain model's weights."""
    import timm

    cfg = timm.models.get_pretrained_cfg(tagged).to_dict()
    if cfg.get("hf_hub_id") == "timm/":
        cfg["hf_hub_id"] = f"timm/{tagged}"
    # the hub copies and users' local files are PyTorch state_dicts; some timm versions would
    # otherwise read a local file as the original JAX .npz
    cfg["custom_load"] = False
    return cfg
