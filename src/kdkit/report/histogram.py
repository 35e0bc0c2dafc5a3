"""Histogram of per-image mIoU (matplotlib, headless), as in Spirit Distillation's Fig. 5."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..engine.segmetrics import hp_acc  # noqa: E402


def plot_miou_histogram(
    series: dict[str, list[float | None]], path: Path, threshold: float = 0.75, bins: int = 20
) -> Path:
    """Overlaid histograms of the per-image mIoU (fractions) of several runs, one colour per run.

    All runs share ``bins`` equal bins from the lowest value or ``theta`` (rounded down to a tenth)
    to 1; the high-precision threshold ``theta`` of HP-Acc (Eq. 7-8) is a dashed line, and each
    legend entry gives the run's HP-Acc (share of images strictly above ``theta``). None/NaN values
    (images without labelled pixels) are left out. Writes a PNG to ``path`` and returns it.
    """
    clean = {
        name: [v for v in values if v is not None and not math.isnan(v)] for name, values in series.items()
    }
    low = math.floor(10 * min([threshold, *(v for values in clean.values() for v in values)])) / 10
    edges = np.linspace(low, 1.0, bins + 1)
    fig, axis = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for name, values in clean.items():
        label = f"{name} (HP-Acc {100 * hp_acc(values, threshold):.1f}%)"
        axis.hist(values, bins=edges, alpha=0.5, label=label)
    axis.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"HP threshold {threshold:g}")
    axis.set_xlabel("per-image mIoU")
    axis.set_ylabel("images")
    axis.set_title("distribution of per-image mIoU")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
