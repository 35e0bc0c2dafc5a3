"""The style preview of a run: training images x, style sources y, and x' at several alphas
(the patent's Fig. 2A / 3 as a grid), written to ``style_preview.png``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _show(axis, image: torch.Tensor, title: str) -> None:
    axis.imshow(image.clamp(0, 1).permute(1, 2, 0).cpu().numpy())
    axis.set_title(title, fontsize=8)
    axis.axis("off")


@torch.no_grad()
def write_style_preview(refiner, images: torch.Tensor, path: Path, alphas: Sequence[float] = ALPHAS) -> Path:
    """One row per training image (uint8 ``[n,3,H,W]``): x, its style source y (when the method uses
    one), and x' for each alpha, made by ``refiner.styled`` exactly as in training."""
    device = refiner.context.device
    content = images.to(device).float().div(255)
    count = content.shape[0]
    # sources spread over the whole set (e.g. night, fog and snow images, not four night ones)
    index = torch.arange(count) * len(refiner.sources) // count if refiner.sources else None
    columns = 2 + len(alphas) if index is not None else 1 + len(alphas)
    fig, axes = plt.subplots(count, columns, figsize=(1.9 * columns, 1.6 * count), dpi=110, squeeze=False)
    for row in range(count):
        _show(axes[row][0], content[row], "x")
        if index is not None:
            source = refiner.sources[int(index[row])].float().div(255)
            _show(axes[row][1], source, "y (style source)")
    for k, alpha in enumerate(alphas):
        styled = refiner.styled(content, index, torch.full((count,), float(alpha), device=device))
        for row in range(count):
            _show(axes[row][columns - len(alphas) + k], styled[row], f"x' (alpha {alpha:g})")
    fig.suptitle(f"style refiner '{refiner.method}'", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
