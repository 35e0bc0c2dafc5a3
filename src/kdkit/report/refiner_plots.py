"""Plots of learnable refiners: the scalars each refiner logs with its updates over the run (for TST:
every primitive's magnitude and probability, the paper's Fig. 2), and a grid of x and the refined x_hat."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .style_preview import _show  # noqa: E402

LABELLED = 16  # a panel with more series names only this many (the highest at the end)


def plot_refiner_state(history: list[dict[str, Any]], name: str, path: Path) -> Path | None:
    """One panel per prefix of the refiner's logged scalars (``m/...``, ``p/...``, ``w/...``) against its
    update count; ``None`` when the refiner logged none."""
    records = [r for r in history if r["kind"] == "refiner" and r["refiner"] == name]
    keys = sorted({k for r in records for k in r if "/" in k})
    if not keys:
        return None
    panels = sorted({k.split("/")[0] for k in keys})
    titles = {
        "m": "magnitude sigmoid(theta_m)",
        "p": "probability sigmoid(theta_p)",
        "w": "sub-policy weight softmax(alpha)",
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2), dpi=110, squeeze=False)
    updates = [r["updates"] for r in records]
    for axis, panel in zip(axes[0], panels):
        names = [k for k in keys if k.startswith(panel + "/")]
        series = {k: [r.get(k, float("nan")) for r in records] for k in names}
        if len(names) > LABELLED:  # many series (DAFA's sub-policies): the top ones by last value, named
            names = sorted(names, key=lambda k: series[k][-1], reverse=True)
            for key in names[LABELLED:]:
                axis.plot(updates, series[key], color="0.75", linewidth=0.6)
            names = names[:LABELLED]
        colours = plt.cm.tab20(range(len(names)))  # 14 primitives: tab10 would repeat its colours
        for key, colour in zip(names, colours):
            axis.plot(updates, series[key], label=key.split("/", 1)[1], color=colour)
        if len(series) > len(names):
            axis.plot([], [], color="0.75", linewidth=0.6, label=f"{len(series) - len(names)} others")
        axis.set_xlabel(f"{name} updates")
        axis.set_ylabel(titles.get(panel, panel))
        if panel in ("m", "p"):
            axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, ncol=2)
    fig.suptitle(f"refiner '{name}': learned parameters over its updates", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


@torch.no_grad()
def write_refined_grid(
    refiner: Any,
    images: torch.Tensor,
    path: Path,
    rows: int = 3,
    targets: torch.Tensor | None = None,
    classes: list[str] | None = None,
) -> Path:
    """Training images x (uint8 ``[n,3,H,W]``, top row) and ``rows`` draws of x_hat made by
    ``refiner.augment`` with its final parameters (one row per draw, seeded 0, 1, ...). Detection:
    ``targets`` (padded ``[n, M, 5]``) are drawn on x and, moved with the pixels, on each x_hat."""
    from .boxes import draw_boxes

    device = refiner.context.device
    unit = images.to(device).float().div(255)
    count = unit.shape[0]
    fig, axes = plt.subplots(rows + 1, count, figsize=(1.5 * count, 1.6 * (rows + 1)), dpi=110, squeeze=False)

    def show(axis, image: torch.Tensor, boxes: torch.Tensor | None, title: str) -> None:
        if boxes is not None:
            valid = boxes[boxes[:, 4] >= 0].cpu()
            pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
            names = classes or [str(i) for i in range(int(valid[:, 4].max()) + 1 if len(valid) else 1)]
            image = draw_boxes(pixels, valid[:, :4], valid[:, 4].long(), names, captions=False).float() / 255
        _show(axis, image, title)

    for col in range(count):
        show(axes[0][col], unit[col], None if targets is None else targets[col], "x")
    moving = None  # segmentation composes the ops (the masks themselves are not shown)
    if refiner.context.task == "segmentation":
        moving = torch.zeros((count, *unit.shape[-2:]), dtype=torch.long, device=device)
    elif targets is not None:
        moving = targets.to(device)
    for row in range(rows):
        generator = torch.Generator().manual_seed(row)
        refined, moved = refiner.augment(unit, moving, generator, count, 0)
        for col in range(count):
            boxes = moved[col] if targets is not None else None
            show(axes[row + 1][col], refined[col], boxes, f"x_hat (draw {row + 1})")
    fig.suptitle("refined samples x_hat with the learned magnitudes and probabilities", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
