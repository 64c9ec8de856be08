"""How much slower torch.sqrt is on a tensor with exact zeros, on this CPU.

    python benchmarks/sqrt_zeros.py

Adam and AdamW take ``exp_avg_sq.sqrt()`` every step. A task's mask switches units off exactly,
so the weights connecting units that no task has used yet get exactly zero gradients, and about
half of ``exp_avg_sq`` is exactly 0 in a HAT network (entries of earlier tasks are not: they had
gradients while their task trained); the same optimizer step then costs more than in the plain
network. This
is PyTorch's kernel on this machine, not HAT's code; it is part of what
``benchmarks/overhead.py`` measures.
"""

from __future__ import annotations

import statistics
import time

import torch


def median_us(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    positive = torch.rand(256, 2048, generator=g) * 1e-6 + 1e-12  # exp_avg_sq of a 2048 -> 256 layer
    half_zero = positive.clone()
    half_zero[torch.rand(positive.shape, generator=g) < 0.5] = 0
    t_pos = median_us(positive.sqrt)
    t_zero = median_us(half_zero.sqrt)
    print(f"sqrt of 524288 positive floats:       {t_pos:8.0f} us")
    print(f"sqrt with half of them exactly 0:     {t_zero:8.0f} us  ({t_zero / t_pos:.1f}x)")
    # the same arrays through numpy's sqrt, for comparison: a slow path here is torch's kernel
    import numpy as np

    a_pos, a_zero = positive.numpy(), half_zero.numpy()
    n_pos = median_us(lambda: np.sqrt(a_pos))
    n_zero = median_us(lambda: np.sqrt(a_zero))
    print(f"numpy, positive / half zeros:         {n_pos:8.0f} / {n_zero:.0f} us  ({n_zero / n_pos:.1f}x)")


if __name__ == "__main__":
    main()
