"""HATConfig: the hyper-parameters every HAT layer of a model shares."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch

from hat._checks import check_positive
from hat.errors import HATTypeError, HATValueError

__all__ = ["HATConfig", "InitStrategy"]

InitStrategy = Literal["normal", "dense", "sparse"]
_INIT_STRATEGIES = ("normal", "dense", "sparse")


@dataclass(eq=True)
class HATConfig(Mapping):
    """Settings shared by the HAT layers of one model.

    Args:
        num_tasks: how many tasks the model will learn (a positive int).
        mask_dim: the dimension of a layer's output that holds its units. ``None`` picks the
            layer's natural one: the last dimension for linear layers, dimension 1 (channels)
            for convolutions.
        init_strat: task embedding initialization. ``"normal"``: N(0, 1) as in the paper (about
            half the units start on); ``"dense"``: all ones (every unit starts on); ``"sparse"``:
            all minus ones (every unit starts off and must be switched on).
        max_trn_mask_scale: s_max, the largest mask scale used in training.
        attn_clamp: task embeddings are clamped to ``[-attn_clamp, attn_clamp]`` after each step.
        grad_comp_clamp: bound on ``s * e`` inside the gradient compensation's cosh.
        grad_comp_factor: the s_max of the compensation formula.
        gate: maps ``scale * embedding`` to a soft mask in [0, 1]; the hard mask is always
            ``embedding > 0``, which is the limit of the sigmoid gate as the scale grows.

    The config unpacks like a mapping (``HATConfig(**dict(cfg))``, ``fn(**cfg)``), as hat-cl's does.
    """

    num_tasks: int
    mask_dim: int | None = None
    init_strat: InitStrategy = "normal"
    max_trn_mask_scale: float = 100.0
    attn_clamp: float = 6.0
    grad_comp_clamp: float = 50.0
    grad_comp_factor: float = 100.0
    gate: Callable[[torch.Tensor], torch.Tensor] = field(default=torch.sigmoid)

    def __post_init__(self) -> None:
        if isinstance(self.num_tasks, bool) or not isinstance(self.num_tasks, numbers.Integral):
            raise HATTypeError(
                f"num_tasks must be a positive int; got {self.num_tasks!r} of type {type(self.num_tasks).__name__}"
            )
        if self.num_tasks <= 0:
            raise HATValueError(f"num_tasks must be a positive int; got {self.num_tasks}")
        self.num_tasks = int(self.num_tasks)
        if self.mask_dim is not None and (isinstance(self.mask_dim, bool)
                                          or not isinstance(self.mask_dim, numbers.Integral)):
            raise HATTypeError(f"mask_dim must be an int or None; got {self.mask_dim!r}")
        if self.init_strat not in _INIT_STRATEGIES:
            raise HATValueError(f"init_strat must be one of {_INIT_STRATEGIES}; got {self.init_strat!r}")
        for name in ("max_trn_mask_scale", "attn_clamp", "grad_comp_clamp", "grad_comp_factor"):
            setattr(self, name, check_positive(getattr(self, name), name))
        if not callable(self.gate):
            raise HATTypeError(f"gate must be callable (e.g. torch.sigmoid); got {self.gate!r}")

    # Mapping protocol: lets users write ``**hat_config`` and ``dict(hat_config)``.
    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    __hash__ = None  # type: ignore[assignment]  # mutable dataclass
