"""The two figures ``hat-cl run --out`` writes (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _figure(size: tuple[float, float]) -> Any:
    # a bare Figure, not pyplot: nothing global changes (backend, open figures) for in-process callers
    from matplotlib.figure import Figure

    return Figure(figsize=size)


def accuracy_matrix(results: dict[str, Any], path: Path) -> None:
    """Row = after training task t, column = task k; accuracy in % written in each cell."""
    matrix = results["matrix"]
    n = len(matrix)
    grid = [[float("nan")] * n for _ in range(n)]
    for t, row in enumerate(matrix):
        for k, acc in enumerate(row):
            grid[t][k] = 100 * acc
    fig = _figure((1.2 + 0.9 * n, 1.0 + 0.8 * n))
    ax = fig.subplots()
    image = ax.imshow(grid, vmin=50, vmax=100, cmap="viridis")
    for t in range(n):
        for k in range(t + 1):
            ax.text(k, t, f"{grid[t][k]:.1f}", ha="center", va="center", color="white" if grid[t][k] < 80 else "black",
                    fontsize=8)
    ax.set_xticks(range(n), [f"task {k}" for k in range(n)])
    ax.set_yticks(range(n), [f"after {t}" for t in range(n)])
    a = results["args"]
    ax.set_title(f"{a['benchmark']} {a['model']} {a['method']}: avg {100 * results['average_accuracy']:.2f}%, "
                 f"BWT {100 * results['bwt'] + 0.0:.3f} pp", fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def capacity(results: dict[str, Any], path: Path) -> None:
    """Per masked layer: the share of units some trained task uses."""
    names = list(results["capacity"])
    shares = [100 * used / total for used, total in results["capacity"].values()]
    fig = _figure((1.5 + 0.8 * len(names), 3.2))
    ax = fig.subplots()
    ax.bar(names, shares, color="tab:blue")
    for i, share in enumerate(shares):
        ax.text(i, share + 1, f"{share:.0f}%", ha="center", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("units used by trained tasks (%)")
    ax.set_title("capacity used per layer", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
