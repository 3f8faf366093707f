"""Figures: a drawing of each discrete cell, and the evolution of softmax(alpha) and of the edge
weights over the search epochs. Matplotlib only, Agg backend."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .genotype import CellGenotype, Genotype

OP_COLOURS = {
    "none": "#bbbbbb",
    "max_pool_3x3": "#1f77b4",
    "avg_pool_3x3": "#17becf",
    "skip_connect": "#d62728",
    "sep_conv_3x3": "#2ca02c",
    "sep_conv_5x5": "#98df8a",
    "sep_conv_7x7": "#bcbd22",
    "dil_conv_3x3": "#9467bd",
    "dil_conv_5x5": "#c5b0d5",
    "conv_7x1_1x7": "#8c564b",
}


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120, **options) -> Path:
    """Saves and closes `fig` at `path`, creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, **options)
    pyplot().close(fig)
    return path


NODE_LABELS = ("$c_{k-2}$", "$c_{k-1}$")  # the DARTS paper's names of a cell's inputs; its output is c_{k}


def _bezier(start, control, end, t: float) -> tuple[float, float]:
    return tuple((1 - t) ** 2 * a + 2 * (1 - t) * t * c + t**2 * b for a, c, b in zip(start, control, end))


def _overlap(a, b) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width * height if width > 0 and height > 0 else 0.0


def draw_cell(cell: CellGenotype, path: str | Path, title: str = "") -> Path:
    """Draws `cell` (see `cell_figure`) to `path`, about 700 pixels wide for four nodes: the width
    of a run's description in the MLflow UI."""
    fig, _ = cell_figure(cell, title)
    return save_figure(fig, path, 80, bbox_inches="tight")


def cell_figure(cell: CellGenotype, title: str = ""):
    """(figure, its node and op label texts): `cell` as a DAG: the two inputs c_{k-2} and c_{k-1} on the left, intermediate nodes
    0..n-1 in the middle, the concatenated output c_{k} on the right, each edge labelled with its
    op. A label goes to the first point along its edge where it overlaps no node and no other label
    (the least overlap where none is free)."""
    plt = pyplot()
    from matplotlib.patches import FancyArrowPatch

    n = len(cell.nodes)
    positions = {0: (0.0, 2.2), 1: (0.0, -2.2)}
    for j in range(n):
        positions[j + 2] = (2.6 + 2.4 * j, 1.4 if j % 2 == 0 else -1.4)
    out_pos = (2.6 + 2.4 * n, 0.0)
    fig, ax = plt.subplots(figsize=(2.6 + 2.1 * n, 5.2))
    ax.set_xlim(-0.9, out_pos[0] + 0.9)
    ax.set_ylim(-3.0, 3.0)
    ax.set_aspect("equal")
    ax.axis("off")
    labels = {0: NODE_LABELS[0], 1: NODE_LABELS[1], **{j + 2: str(j) for j in range(n)}}
    boxes = []
    node_texts = []
    for index, (x, y) in positions.items():
        empty = index >= 2 and not cell.nodes[index - 2]
        colour = "#a6cee3" if index < 2 else ("#eeeeee" if empty else "#fdbf6f")
        node_texts.append(ax.text(x, y, labels[index], ha="center", va="center", fontsize=11, zorder=3,
                                  bbox={"boxstyle": "round,pad=0.4", "fc": colour, "ec": "#555555"}))  # fmt: skip
    node_texts.append(ax.text(*out_pos, "$c_{k}$", ha="center", va="center", fontsize=11, zorder=3,
                              bbox={"boxstyle": "round,pad=0.4", "fc": "#b2df8a", "ec": "#555555"}))  # fmt: skip
    for c in cell.concat:
        ax.add_patch(FancyArrowPatch(positions[c], out_pos, arrowstyle="-|>", mutation_scale=10, color="#999999",
                                     lw=0.8, linestyle="--", shrinkA=16, shrinkB=18))  # fmt: skip
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer).expanded(1.05, 1.1) for t in node_texts]
    texts = list(node_texts)
    for node, source, op in cell.edges():
        start, end = positions[source], positions[node]
        rad = 0.25 if (node - source) % 2 else -0.25
        colour = OP_COLOURS.get(op, "black")
        ax.add_patch(FancyArrowPatch(start, end, connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>",
                                     mutation_scale=12, color=colour, lw=1.6, shrinkA=16, shrinkB=16))  # fmt: skip
        # matplotlib's arc3 curve is a quadratic Bezier with its control point at the chord's
        # midpoint + rad * (dy, -dx).
        dx, dy = end[0] - start[0], end[1] - start[1]
        control = ((start[0] + end[0]) / 2 + rad * dy, (start[1] + end[1]) / 2 - rad * dx)
        text = ax.text(0, 0, op, fontsize=9, ha="center", va="center", color=colour, zorder=4,
                       bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": colour, "lw": 0.5, "alpha": 0.95})  # fmt: skip
        best = None
        for t in (0.5, 0.62, 0.38, 0.72, 0.28, 0.8, 0.2, 0.86, 0.14):
            text.set_position(_bezier(start, control, end, t))
            box = text.get_window_extent(renderer)
            clash = sum(_overlap(box, other) for other in boxes)
            if best is None or clash < best[0]:
                best = (clash, t, box)
            if clash == 0:
                break
        text.set_position(_bezier(start, control, end, best[1]))
        boxes.append(best[2])
        texts.append(text)
    if title:
        ax.set_title(title, fontsize=11)
    return fig, texts


def draw_genotype(genotype: Genotype, directory: str | Path, prefix: str = "cell_") -> list[Path]:
    """One PNG per level, named `{prefix}{level}.png`."""
    directory = Path(directory)
    return [
        draw_cell(cell, directory / f"{prefix}{name}.png", f"{name} cell" + (" (reduction)" if cell.reduction else ""))
        for name, cell in genotype.levels.items()
    ]


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _edge_labels(nodes: int) -> list[str]:
    return [f"{i}->{j + 2}" for j in range(nodes) for i in range(j + 2)]


def plot_alpha_evolution(
    history: Sequence[Mapping[str, Any]], ops: Sequence[str], level: str, nodes: int, path: str | Path, title: str = ""
) -> Path:
    """softmax(alpha) of every op on every edge of `level` against the epoch: one panel per edge."""
    plt = pyplot()
    epochs = [record["epoch"] for record in history]
    series = [record["softmax_alpha"][level] for record in history]  # epoch x edge x op
    labels = _edge_labels(nodes)
    cols = min(nodes + 1, 5)
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.2 * rows), sharex=True, sharey=True, squeeze=False)
    for e, label in enumerate(labels):
        ax = axes[e // cols][e % cols]
        for o, op in enumerate(ops):
            ax.plot(epochs, [s[e][o] for s in series], color=OP_COLOURS.get(op), lw=1.3, label=op)
        ax.set_title(f"edge {label}", fontsize=8)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    for e in range(len(labels), rows * cols):
        axes[e // cols][e % cols].axis("off")
    _integer_epochs(axes[0][0])
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles,
        names,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.955),
        ncol=min(len(ops), 8),
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(title or f"softmax(alpha) per edge, {level} cells", fontsize=10)
    fig.supxlabel("epoch", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return save_figure(fig, path, 110)


def plot_edge_weights(
    history: Sequence[Mapping[str, Any]], level: str, nodes: int, path: str | Path, title: str = ""
) -> Path:
    """The trained edge weight of every edge of `level` against the epoch (methods with beta)."""
    plt = pyplot()
    epochs = [record["epoch"] for record in history]
    series = [record["edge_weights"][level] for record in history]
    labels = _edge_labels(nodes)
    fig, axes = plt.subplots(1, nodes, figsize=(3.0 * nodes, 2.6), sharey=True, squeeze=False)
    for j in range(nodes):
        ax = axes[0][j]
        start = j * (j + 3) // 2
        for e in range(start, start + j + 2):
            ax.plot(epochs, [s[e] for s in series], lw=1.3, label=labels[e])
        ax.set_title(f"node {j + 2}", fontsize=9)
        _integer_epochs(ax)
        ax.legend(fontsize=7, frameon=False)
        ax.tick_params(labelsize=7)
    fig.suptitle(title or f"edge weights, {level} cells", fontsize=10)
    fig.supxlabel("epoch", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, 110)
