"""hat-cl's ``hat.constants``: the defaults of ``HATConfig``, read from it (one source of truth),
and the default scale schedule of ``hat.utils.get_hat_mask_scale``."""

from __future__ import annotations

from dataclasses import fields
from typing import Final

from hat.config import HATConfig

__all__ = ["DEF_HAT_ATTN_CLAMP", "DEF_HAT_GRAD_COMP_CLAMP", "DEF_HAT_GRAD_COMP_FACTOR", "DEF_HAT_INIT_STRAT",
           "DEF_HAT_MAX_TRN_MASK_SCALE", "DEF_HAT_TRN_MASK_SCALE_STRAT"]

_DEFAULTS = {f.name: f.default for f in fields(HATConfig)}

DEF_HAT_MAX_TRN_MASK_SCALE: Final[float] = _DEFAULTS["max_trn_mask_scale"]
DEF_HAT_INIT_STRAT: Final[str] = _DEFAULTS["init_strat"]
DEF_HAT_GRAD_COMP_CLAMP: Final[float] = _DEFAULTS["grad_comp_clamp"]
DEF_HAT_GRAD_COMP_FACTOR: Final[float] = _DEFAULTS["grad_comp_factor"]
DEF_HAT_ATTN_CLAMP: Final[float] = _DEFAULTS["attn_clamp"]
DEF_HAT_TRN_MASK_SCALE_STRAT: Final[str] = "linear"
