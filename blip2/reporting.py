"""Plots for job reports (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def plot_curves(history: Sequence[dict], keys: Sequence[str], out: str | Path, title: str = "",
                smooth: int = 10, panels: Mapping[str, Sequence[str]] | None = None) -> Path:
    """Training curves: each of ``keys`` against ``step``, raw (faint) and as a moving average.

    ``panels`` adds one plot per entry, beside the losses: its title and the history keys it draws (keys
    that no history entry has are skipped, so older histories still plot)."""
    plt = _pyplot()

    panels = {name: [k for k in panel_keys if any(k in h for h in history)]
              for name, panel_keys in (panels or {}).items()}
    panels = {name: panel_keys for name, panel_keys in panels.items() if panel_keys}
    figure, axes = plt.subplots(1, 1 + len(panels), figsize=(7 + 5 * len(panels), 4), squeeze=False)
    _plot_keys(axes[0][0], history, keys, smooth, "loss", title)
    for axis, (name, panel_keys) in zip(axes[0][1:], panels.items()):
        _plot_keys(axis, history, panel_keys, smooth, "", name)
    return _save(plt, figure, out)


def _plot_keys(axis, history: Sequence[dict], keys: Sequence[str], smooth: int, ylabel: str, title: str) -> None:
    for key in keys:
        points = [(h["step"], h[key]) for h in history if key in h]
        steps = np.array([p[0] for p in points])
        values = np.array([p[1] for p in points], dtype=float)
        line, = axis.plot(steps, values, alpha=0.25)
        if len(values) >= smooth:
            kernel = np.ones(smooth) / smooth
            axis.plot(steps[smooth - 1:], np.convolve(values, kernel, mode="valid"), color=line.get_color(),
                      label=key)
        else:
            line.set_label(key)
    axis.set_xlabel("step")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize=8)


def plot_workflow(curves: Mapping[str, Sequence[dict]], retrieval: Mapping[str, Mapping[str, float]],
                  accuracy: Mapping[str, float], held_out: Sequence[str], seconds: Mapping[str, float],
                  out: str | Path) -> Path:
    """The end-to-end run on one page: every training run's loss against its steps, stage-1 retrieval
    per training set (bars per metric), instruction accuracy per task family (held-out families hatched)
    and the wall time of every step."""
    plt = _pyplot()

    figure, ((losses, recall), (families, times)) = plt.subplots(2, 2, figsize=(12, 8))
    for name, history in curves.items():
        losses.plot([h["step"] for h in history], [h["loss"] for h in history], label=name, linewidth=1)
    losses.set(xlabel="step", ylabel="training loss", title="training runs")
    losses.legend(fontsize=8)

    metrics = list(dict.fromkeys(metric for values in retrieval.values() for metric in values))
    width = 0.8 / max(len(retrieval), 1)
    for i, (name, values) in enumerate(retrieval.items()):
        positions = np.arange(len(metrics)) + i * width
        recall.bar(positions, [values.get(m, np.nan) for m in metrics], width, label=name)
    recall.set_xticks(np.arange(len(metrics)) + width * (len(retrieval) - 1) / 2, metrics, fontsize=8)
    recall.set(ylim=(0, 1), ylabel="recall@1 on held-out test", title="stage 1: which training data")
    recall.legend(fontsize=8)

    names = list(accuracy)
    bars = families.bar(names, [accuracy[n] for n in names])
    for bar, name in zip(bars, names, strict=True):
        if name in held_out:
            bar.set_hatch("//")
            bar.set_facecolor("white")
            bar.set_edgecolor("black")
    families.set(ylim=(0, 1), ylabel="exact-match accuracy", title="instruction following (hatched: held out)")
    families.tick_params(axis="x", labelsize=8)

    steps = list(seconds)
    times.barh(steps, [seconds[s] for s in steps])
    times.invert_yaxis()
    times.set(xlabel="seconds", title=f"wall time per step (total {sum(seconds.values()):.0f} s)")
    times.tick_params(axis="y", labelsize=8)
    return _save(plt, figure, out)


def plot_metrics(metrics: Mapping[str, object], out: str | Path, title: str = "") -> Path:
    """An evaluation's numbers as horizontal bars (counts and non-numbers left out)."""
    plt = _pyplot()

    values = {k: float(v) for k, v in metrics.items()
              if isinstance(v, float) and not k.startswith(("num_", "unreadable"))}
    figure, axis = plt.subplots(figsize=(7, 0.8 + 0.3 * max(len(values), 1)))
    axis.barh(list(values), list(values.values()))
    axis.invert_yaxis()
    axis.set(title=title, xlabel="score")
    axis.tick_params(axis="y", labelsize=8)
    return _save(plt, figure, out)


def _pyplot():
    """matplotlib's pyplot on the headless Agg backend (no display on training machines or servers),
    imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, figure, out: str | Path) -> Path:
    figure.tight_layout()
    out = Path(out)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
