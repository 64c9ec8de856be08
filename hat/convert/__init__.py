"""One-line conversion of plain models: ``convert``/``unconvert`` and task selection (``api``), the
default mapping of torch/timm/torchvision layers (``mapping``), the first-call trace that finds
where each mask flows (``trace``), BatchNorm statistics refreshed at task end (``statistics``),
and the coverage report (``coverage``)."""
