"""The partition's class-count figure, shared by `FederatedDataModule.plot_class_counts` and `sparsyfed plot`.

Needs matplotlib and numpy only (no torch), so that `sparsyfed plot` stays light.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

# Up to this many classes each gets its own colour in stacked bars with a legend; above, a heat map
# with a colour bar is readable where 35 or 100 legend entries would not be.
MAX_LEGEND_CLASSES = 20


def class_counts_figure(counts: np.ndarray, title: str) -> Figure:
    """A figure of a `(clients, classes)` table of training samples (stacked bars or a heat map)."""
    counts = np.asarray(counts)
    clients, classes = counts.shape
    figure = Figure(figsize=(min(max(6.0, 0.25 * clients + 3), 20), 4.5))
    axes = figure.add_subplot()
    if classes <= MAX_LEGEND_CLASSES:
        colours = _class_colours(classes)
        bottom = np.zeros(clients)
        for c in range(classes):
            axes.bar(np.arange(clients), counts[:, c], bottom=bottom, color=colours[c], width=0.9, label=str(c))
            bottom += counts[:, c]
        axes.set_ylabel("training samples")
        axes.set_xlim(-0.6, clients - 0.4)
        if clients <= 30:
            axes.set_xticks(range(clients))
        axes.legend(title="class", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small",
                    ncol=1 if classes <= 12 else 2)
    else:
        image = axes.imshow(counts.T, aspect="auto", interpolation="nearest", cmap="viridis")
        figure.colorbar(image, ax=axes, label="training samples of the class")
        axes.set_ylabel("class")
    axes.set_xlabel("client")
    axes.set_title(title)
    figure.tight_layout()
    return figure


def _class_colours(classes: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    palette = colormaps["tab10" if classes <= 10 else "tab20"]
    return [palette(c) for c in range(classes)]
