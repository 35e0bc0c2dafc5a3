"""``image_folder``: labelled images on disk, one subfolder per class.

Layout: ``<root>/<split>/<class>/*.{png,jpg,jpeg,bmp,webp}`` with split ``train``, ``val`` or
``test``. When ``root`` has none of those split folders it is read as the class folders
themselves, and every split then returns the same images. Classes are the sorted union of
the class folders of all splits, so label indices agree between splits. Images are converted
to RGB; with ``image_size`` the shorter side is resized to it and the centre square kept.
A class folder without images is an error (its class would stay in the classifier's head).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import KdkitError
from ..registry import DATASETS
from .base import ImageDataset, Stats, TensorDataset, channel_stats

SPLITS = ("train", "val", "test")
EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
STATS_SAMPLE = 500  # images decoded to estimate mean/std of a streamed split
LAYOUT = "<root>/<split>/<class>/<image>.png (split: train/val/test), or <root>/<class>/<image>.png"


def load_image(path: Path, image_size: int | None = None, resize_size: int | None = None) -> Tensor:
    """Decode one file to uint8 ``[3,H,W]``; with ``image_size``, the shorter side resized to
    ``resize_size`` (default ``image_size``) and the centre ``image_size`` square kept (ImageNet
    evaluation: 256 then 224). A corrupt file raises KdkitError naming it."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if image_size is not None:
                short = max(resize_size or image_size, image_size)
                scale = short / min(im.size)
                w, h = max(short, round(im.width * scale)), max(short, round(im.height * scale))
                left, top = (w - image_size) // 2, (h - image_size) // 2
                im = im.resize((w, h), Image.BILINEAR).crop((left, top, left + image_size, top + image_size))
            array = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise KdkitError(f"cannot read image {path} ({e}); remove or fix the file") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _list_files(root: Path, split: str) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, classes) of a split, in sorted class then file order."""
    if not root.is_dir():
        raise KdkitError(f"image folder '{root}' does not exist; expected {LAYOUT}")
    present = [s for s in SPLITS if (root / s).is_dir()]
    if present and split not in present:
        raise KdkitError(f"image folder '{root}' has no '{split}' folder (found: {', '.join(present)})")
    split_dirs = [root / s for s in present] or [root]
    classes = sorted(
        {d.name for s in split_dirs for d in s.iterdir() if d.is_dir() and not d.name.startswith(".")}
    )
    if not classes:
        raise KdkitError(f"image folder '{root}' has no class folders; expected {LAYOUT}")
    here = root / split if present else root
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = here / name
        found = sorted(p for p in folder.glob("*") if p.suffix.lower() in EXTENSIONS)
        if folder.is_dir() and not found:
            raise KdkitError(
                f"class folder '{folder}' has no images ({', '.join(sorted(EXTENSIONS))}); add images or "
                "remove the folder (its class would otherwise stay in the classifier with no examples)"
            )
        files += found
        labels += [label] * len(found)
    if not files:
        raise KdkitError(f"no images under '{here}' ({', '.join(sorted(EXTENSIONS))}); expected {LAYOUT}")
    return files, labels, classes


class FolderDataset(ImageDataset):
    """Decodes each image on access (in DataLoader workers); ``labels`` is known up front."""

    def __init__(
        self,
        files: list[Path],
        labels: list[int],
        classes: list[str],
        image_size: int | None,
        mean: Stats,
        std: Stats,
        resize_size: int | None = None,
    ) -> None:
        super().__init__(classes, mean, std)
        self.files = files
        self.image_size, self.resize_size = image_size, resize_size
        self.labels = torch.tensor(labels, dtype=torch.int64)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return load_image(self.files[index], self.image_size, self.resize_size), int(self.labels[index])


@DATASETS.register("image_folder", "your images: <root>/<split>/<class>/*.png|jpg (set root)")
def image_folder(
    split: str,
    root: str | None = None,
    image_size: int | None = None,
    cache: bool = False,
    mean: Stats | None = None,
    std: Stats | None = None,
    resize_size: int | None = None,
) -> ImageDataset:
    """Images from class folders; ``cache`` decodes the whole split into memory. ``image_size``: the
    shorter side resized to ``resize_size`` (default ``image_size``), the centre square kept. Without
    ``image_size`` images keep their size (a random-resized crop at decode time sizes them).

    ``mean``/``std`` default to statistics of (a deterministic subsample of) the split.
    Without ``image_size`` all images must have the same size to be batched.
    """
    if root is None:
        raise KdkitError(f"image_folder needs root (the folder laid out as {LAYOUT})")
    files, labels, classes = _list_files(Path(root).expanduser(), split)
    if cache:
        images = [load_image(f, image_size, resize_size) for f in files]
        sizes = {tuple(im.shape) for im in images}
        if len(sizes) > 1:
            raise KdkitError(
                f"images under '{root}' have different sizes {sorted(sizes)[:3]}; set image_size"
            )
        return TensorDataset(torch.stack(images), torch.tensor(labels), classes, mean, std)
    if mean is None or std is None:
        step = max(1, len(files) // STATS_SAMPLE)
        mean, std = channel_stats([load_image(f, image_size, resize_size) for f in files[::step]])
    return FolderDataset(files, labels, classes, image_size, mean, std, resize_size)
