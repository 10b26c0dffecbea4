"""Plots for job reports (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def plot_curves(history: Sequence[dict], keys: Sequence[str], out: str | Path, title: str = "",
                smooth: int = 10) -> Path:
    """Training curves: each of ``keys`` against ``step``, raw (faint) and as a moving average."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    steps = np.array([h["step"] for h in history])
    for key in keys:
        values = np.array([h[key] for h in history], dtype=float)
        line, = axis.plot(steps, values, alpha=0.25)
        if len(values) >= smooth:
            kernel = np.ones(smooth) / smooth
            axis.plot(steps[smooth - 1:], np.convolve(values, kernel, mode="valid"), color=line.get_color(),
                      label=key)
        else:
            line.set_label(key)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    out = Path(out)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
