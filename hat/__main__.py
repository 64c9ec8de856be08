"""``python -m hat``: see :mod:`hat.app.cli`."""

from __future__ import annotations

import os

import torch

from hat.app.cli import main

if __name__ == "__main__":
    # Small networks run fastest on few threads; only here, never inside main(), which tests and
    # other in-process callers run without global side effects.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    raise SystemExit(main())
