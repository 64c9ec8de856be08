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


# tab10 without its grey, which marks free units; then one more for a tenth task
_TASK_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                 "tab:olive", "tab:cyan", "gold")
_FREE_COLOUR = "#c8c8c8"


def capacity(results: dict[str, Any], path: Path) -> None:
    """Two panels sharing one row per HAT layer, in percent of the layer's units.

    Left, who took which units: a stacked bar of the units each task added (used by no earlier
    task), in training order, then the free units in grey; the segments sum to 100 %. Right, what
    each task uses: one thin bar per task, its units shared with earlier tasks hatched, the ones
    it added solid, so ``used = shared + added`` reads off its length.
    """
    from matplotlib.patches import Patch

    report = results["capacity"]
    names = list(report)
    tasks = sorted({t["task"] for layer in report.values() for t in layer["tasks"]})
    colour = {task: _TASK_COLOURS[i % len(_TASK_COLOURS)] for i, task in enumerate(tasks)}
    slot = {task: i for i, task in enumerate(tasks)}
    band = 0.8  # each layer's share of its row; the rest is the gap to the next layer
    thin = band / max(len(tasks), 1)
    fig = _figure((10.0, 1.6 + len(names) * (0.3 + 0.14 * len(tasks))))
    fig.set_layout_engine("constrained")
    who, what = fig.subplots(1, 2, sharey=True)
    for row, layer in enumerate(report.values()):
        pct = 100 / layer["units"]
        left = 0.0
        for t in layer["tasks"]:
            width = pct * t["added"]
            who.barh(row, width, left=left, height=band, color=colour[t["task"]], edgecolor="white", linewidth=0.5)
            if width >= 7:
                who.text(left + width / 2, row, f"{width:.0f}", ha="center", va="center", fontsize=7, color="white")
            left += width
        who.barh(row, pct * layer["free"], left=left, height=band, color=_FREE_COLOUR)
        if pct * layer["free"] >= 7:
            who.text(left + pct * layer["free"] / 2, row, f"{pct * layer['free']:.0f}", ha="center", va="center",
                     fontsize=7)
        for t in layer["tasks"]:
            y = row - band / 2 + thin * (slot[t["task"]] + 0.5)
            what.barh(y, pct * t["shared"], height=0.85 * thin, color="white", edgecolor=colour[t["task"]],
                      hatch="////", linewidth=0.8)
            what.barh(y, pct * t["added"], left=pct * t["shared"], height=0.85 * thin, color=colour[t["task"]])
    who.set_yticks(range(len(names)), names)
    who.set_ylim(len(names) - 0.5, -0.5)  # first layer on top, no padding rows
    for ax, title in ((who, "who took which units: added by each task, then free"),
                      (what, "what each task uses: shared (hatched) + added")):
        ax.set_xlim(0, 100)
        ax.set_xlabel("% of the layer's units")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    handles = [Patch(color=colour[t], label=f"task {t}") for t in tasks]
    handles += [Patch(color=_FREE_COLOUR, label="free"),
                Patch(facecolor="white", edgecolor="black", hatch="////", label="shared with earlier tasks")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)
    a = results["args"]
    fig.suptitle(f"capacity per layer: {a['benchmark']} {a['model']}, {len(tasks)} tasks", fontsize=10)
    fig.savefig(path, dpi=120)
