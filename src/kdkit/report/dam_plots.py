"""The DAM plot of SoKD (term ``dam``): sample images with the detector's heatmap overlaid and the
distinctive areas it selected drawn as boxes (the areas whose masks restrict the feature loss)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from .style_preview import _show  # noqa: E402


@torch.no_grad()
def plot_dam(
    images: torch.Tensor,
    heatmaps: torch.Tensor,
    boxes: torch.Tensor,
    feature_size: tuple[int, int],
    path: Path,
) -> Path:
    """One column per image: the image (uint8 ``[n,3,H,W]``) on top; below it the heatmap ``[n,h,w]``
    (values in [0, 1], e.g. :meth:`kdkit.terms.dam.DAM.detect`'s score) upsampled bilinearly over the
    image and the boxes ``[n,N,4]`` (``y0, x0, y1, x1`` in cells of the ``feature_size = (h, w)`` map),
    scaled to image pixels and numbered by rank (1 = highest score)."""
    unit = images.detach().cpu().float().div(255)
    count, (height, width) = unit.shape[0], unit.shape[-2:]
    h, w = feature_size
    heat = F.interpolate(
        heatmaps.detach().cpu().float().unsqueeze(1),
        size=(height, width),
        mode="bilinear",
        align_corners=False,
    )[:, 0]
    scale = torch.tensor([height / h, width / w, height / h, width / w])
    fig, axes = plt.subplots(2, count, figsize=(1.9 * count, 4.0), dpi=110, squeeze=False)
    for col in range(count):
        _show(axes[0][col], unit[col], "image")
        axis = axes[1][col]
        _show(axis, unit[col], "heatmap + areas")
        axis.imshow(
            heat[col].clamp(0, 1).numpy(),
            cmap="jet",
            alpha=0.45,
            vmin=0.0,
            vmax=1.0,
            extent=(-0.5, width - 0.5, height - 0.5, -0.5),
        )
        for rank, box in enumerate(boxes[col].detach().cpu().float() * scale):
            y0, x0, y1, x1 = (float(v) for v in box)
            axis.add_patch(
                Rectangle(
                    (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.2
                )
            )
            axis.text(x0 - 0.3, y0 + 0.3, str(rank + 1), color="white", fontsize=6, va="top")
    fig.suptitle(f"DAM: heatmap and the {boxes.shape[1]} selected areas ({h}x{w} feature map)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
