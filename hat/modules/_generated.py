"""HAT classes derived for subclasses of the torch layers (timm's ``Conv2dSame``, ``StdConv2d``,
torch's ``NonDynamicallyQuantizableLinear`` ...), made on demand by ``derive``.

``HATConv2d`` for a ``Conv2dSame`` is ``class HATConv2dSame(HATConv2d, Conv2dSame)``: the HAT
bookkeeping of the one, the forward and attributes of the other. Each class gets a name in this
module that encodes both parents, and this module's ``__getattr__`` makes it again from that
name, so a pickled model (``torch.save(model)``) loads in a new process.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from hat.modules.task_params import TaskParameters

__all__ = ["derive", "derive_params", "make_task_parameters"]

# base classes whose weight is transformed row by row before use (weight standardization): an
# entry of a row that a task does not read still moves the values that task reads, so the rows
# of used units are protected whole
_ROW_MIXING = ("StdConv1d", "StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")


def _escape(text: str) -> str:
    return text.replace("_", "_0").replace(".", "_1")


def _unescape(text: str) -> str:
    return text.replace("_1", ".").replace("_0", "_")


def derive(hat_cls: type, base: type) -> type:
    """The class deriving from ``hat_cls`` and ``base`` (a subclass of ``hat_cls``'s torch layer)."""
    attrs: dict[str, Any] = {"__doc__": f"{hat_cls.__name__} for {base.__module__}.{base.__qualname__}.\n\n"
                                        f"{hat_cls.__doc__ or ''}"}
    if base.__name__ in _ROW_MIXING:
        attrs["_hat_whole_rows"] = "weight standardization mixes every entry of a row"
    return _make(f"{hat_cls.__name__}__{_escape(base.__module__)}__{_escape(base.__qualname__)}", (hat_cls, base),
                 base, attrs)


def derive_params(base: type, names: tuple[str, ...]) -> type:
    """The class of a module of class ``base`` whose own parameters ``names`` are per task
    (``hat.modules.task_params``): reading ``module.<name>`` gives the selected task's row."""
    attrs: dict[str, Any] = {
        "_hat_row_params": names,
        "__doc__": f"{base.__qualname__} with its parameters {', '.join(names)} per task (hat.modules.task_params).",
    }
    for n in names:
        attrs[n] = property(lambda self, n=n: self._hat_param_row(n))
    name = f"TaskParameters__{_escape(base.__module__)}__{_escape(base.__qualname__)}__{_escape('.'.join(names))}"
    return _make(name, (TaskParameters, base), base, attrs)


def make_task_parameters(module: nn.Module, names: list[str], num_tasks: int) -> None:
    """Give ``module``'s parameters ``names`` one row per task (in place, keeping their names)."""
    device = None
    for name in names:
        p = module._parameters[name]
        device = p.device
        module._parameters[name] = nn.Parameter(p.detach().unsqueeze(0).expand(num_tasks + 1, *p.shape).clone(),
                                                requires_grad=p.requires_grad)
    module.__class__ = derive_params(type(module), tuple(names))
    module.__dict__["_hat_row_params"] = tuple(names)
    module._hat_init_tracking(num_tasks, device)


def _make(name: str, bases: tuple[type, ...], base: type, attrs: dict[str, Any]) -> type:
    """The class ``name`` (made once, then kept in this module under that name)."""
    made = globals().get(name)
    if made is None:
        made = type(name, bases, {"_hat_base": base, "__module__": __name__, "__qualname__": name, **attrs})
        globals()[name] = made
    return made


def _import(module: str, qualname: str) -> Any:
    base: Any = importlib.import_module(_unescape(module))
    for part in _unescape(qualname).split("."):
        base = getattr(base, part)
    return base


def __getattr__(name: str) -> type:
    """Make a derived class again from its name (unpickling in a new process)."""
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return _remake(name)
    except (ImportError, AttributeError, ValueError):
        raise AttributeError(name) from None


def _remake(name: str) -> type:
    pieces = name.split("__")
    if len(pieces) == 4 and pieces[0] == "TaskParameters":
        return derive_params(_import(pieces[1], pieces[2]), tuple(_unescape(pieces[3]).split(".")))
    hat_name, module, qualname = pieces
    import hat.modules

    hat_cls = getattr(hat.modules, hat_name, None)
    base = _import(module, qualname)
    if not isinstance(hat_cls, type) or not isinstance(base, type):
        raise AttributeError(name)
    return derive(hat_cls, base)
