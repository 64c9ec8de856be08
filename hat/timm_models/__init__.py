"""HAT networks registered in timm: ``import hat.timm_models`` and then

    timm.create_model("hat_resnet18", hat_config=HATConfig(num_tasks=5), num_classes=10)

Registered: ``hat_resnet18``, ``hat_resnet34``, ``hat_resnet18s``, ``hat_resnet34s`` (small
images: a 3x3 stride-1 first convolution, max-pool kept) and ``hat_vit_tiny_patch16_224``.
Each is timm's own architecture, built (and, with ``pretrained=True``, loaded) as the plain
model, then converted with ``hat.convert``.
"""

from __future__ import annotations

try:
    import timm  # noqa: F401
except (ImportError, RuntimeError) as err:  # timm under a torch it does not support raises RuntimeError
    raise ImportError("hat.timm_models needs timm 1.x with a torch it supports "
                      f"(pip install 'hat-cl[timm]'): {err}") from err

from hat.timm_models import hat_resnet, hat_vision_transformer
from hat.timm_models._common import HATTimmModel

__all__ = ["HATTimmModel", "hat_resnet", "hat_vision_transformer"]
