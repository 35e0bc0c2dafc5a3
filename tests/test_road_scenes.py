"""road_scenes: the procedural segmentation dataset (cities, styles, cache, determinism)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdkit.data import build_dataset
from kdkit.data import road_scenes as rs
from kdkit.data.base import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, SegmentationTensorDataset
from kdkit.errors import KdkitError

SMALL = dict(train_size=24, test_size=12, image_size=(32, 64))


def small(root: Path, split: str = "train", **params) -> SegmentationTensorDataset:
    return build_dataset("road_scenes", split, root=str(root), **{**SMALL, **params})


@pytest.fixture(scope="module")
def city_masks() -> dict[str, np.ndarray]:
    """200 day masks of each of source and target at the default size (no styles rendered)."""
    return {city: rs.generate(city, "val", [], 200, (64, 128), 0)[1] for city in ("source", "target")}


def test_contract(tmp_path):
    ds = small(tmp_path)
    assert isinstance(ds, SegmentationTensorDataset) and ds.task == "segmentation"
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (24, 3, 32, 64)
    assert ds.labels.dtype == torch.uint8 and ds.labels.shape == (24, 32, 64)
    assert ds.classes == list(rs.CLASSES) and ds.classes[:8] == [
        "road", "sidewalk", "building", "vegetation", "sky", "car", "person", "pole",
    ]  # fmt: skip
    assert int(ds.labels.max()) < len(rs.CLASSES)
    image, mask = ds[3]
    assert torch.equal(image, ds.images[3]) and torch.equal(mask, ds.labels[3])
    assert (ds.mean, ds.std) == (IMAGENET_MEAN, IMAGENET_STD)  # the same for every city and style
    assert len(small(tmp_path, "val")) == len(small(tmp_path, "test")) == 12
    both = small(tmp_path, "test", city=["source", "target"])
    assert len(both) == 24 and torch.equal(both.images[12:], small(tmp_path, "test", city="target").images)


def test_deterministic_and_splits_differ(tmp_path):
    a, b = small(tmp_path / "a"), small(tmp_path / "b")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(small(tmp_path / "c", seed=1).images, a.images)
    val, test = small(tmp_path / "a", "val"), small(tmp_path / "a", "test")
    assert not torch.equal(val.images, test.images) and not torch.equal(a.images[:12], test.images)


def test_styles_share_content_and_masks(tmp_path):
    styles = list(rs.STYLES)
    assert {"day", "dusk", "night", "fog", "rain", "snow"} <= set(styles)
    images, masks = rs.generate("source", "test", styles, 8, (32, 64), 0)
    fog, fog_masks = rs.generate("source", "test", ["fog"], 8, (32, 64), 0)
    assert np.array_equal(fog["fog"], images["fog"]) and np.array_equal(fog_masks, masks)
    day = images["day"].astype(float)
    for style in styles[1:]:
        assert np.abs(images[style] - day).mean() > 5, style
    assert images["night"].mean() < day.mean() - 40  # dark
    # the dataset concatenates styles, each with the same masks
    ds = small(tmp_path, "test", styles=["day", "rain"])
    n = len(ds) // 2
    assert torch.equal(ds.labels[:n], ds.labels[n:]) and not torch.equal(ds.images[:n], ds.images[n:])


def test_content_does_not_depend_on_size():
    few, few_masks = rs.generate("target", "train", ["day"], 30, (32, 64), 0)
    many, many_masks = rs.generate("target", "train", ["day"], rs.CHUNK + 30, (32, 64), 0)
    assert np.array_equal(few["day"], many["day"][:30]) and np.array_equal(few_masks, many_masks[:30])


def test_all_classes_present(city_masks):
    seen = np.bincount(city_masks["source"].ravel(), minlength=len(rs.CLASSES))
    assert (seen > 0).all(), dict(zip(rs.CLASSES, seen.tolist()))
    thin = [rs.CLASSES.index(c) for c in ("person", "pole", "traffic_sign")]
    assert all(0 < seen[k] / seen.sum() < 0.02 for k in thin)  # small or thin


def test_cities_differ(city_masks):
    freq = {c: np.bincount(m.ravel(), minlength=len(rs.CLASSES)) / m.size for c, m in city_masks.items()}
    sky, building, car = (rs.CLASSES.index(c) for c in ("sky", "building", "car"))
    assert freq["source"][sky] > 1.5 * freq["target"][sky]  # downtown: narrow sky
    assert freq["target"][building] > 1.5 * freq["source"][building]
    assert freq["target"][car] > 1.5 * freq["source"][car]
    assert set(rs.CITIES) >= {"source", "target", "proximity"}


def test_unlabeled(tmp_path):
    labeled, unlabeled = small(tmp_path), small(tmp_path, labeled=False)
    assert torch.equal(labeled.images, unlabeled.images)
    assert (unlabeled.labels == IGNORE_INDEX).all()


def test_cache_reused_and_layout(tmp_path, monkeypatch):
    ds = small(tmp_path, "test")
    (style_dir,) = tmp_path.glob("v*/source/day")
    npz = style_dir / "test.npz"
    stamp = npz.stat().st_mtime_ns
    assert (style_dir / "classes.txt").read_text().split() == list(rs.CLASSES)
    pngs = sorted((style_dir / "masks" / "test").glob("*.png"))
    assert [p.name for p in pngs[:2]] == ["00000.png", "00001.png"] and len(pngs) == 12
    mask = Image.open(pngs[5])
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), ds.labels[5].numpy())
    image = np.asarray(Image.open(style_dir / "images" / "test" / "00005.png"))
    assert np.array_equal(image, ds.images[5].permute(1, 2, 0).numpy())
    calls = []
    real = rs.generate
    monkeypatch.setattr(rs, "generate", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = small(tmp_path, "test")
    assert torch.equal(again.images, ds.images) and npz.stat().st_mtime_ns == stamp and not calls
    small(tmp_path, "test", styles=["day", "fog"])  # only the missing style is rendered
    assert [a[2] for a in calls] == [["fog"]]
    assert not list(tmp_path.rglob(".*tmp*")), "temp dirs left behind"


def test_errors_name_the_bad_value(tmp_path):
    with pytest.raises(KdkitError, match="'tagret'.*'target'"):
        small(tmp_path, city="tagret")
    with pytest.raises(KdkitError, match="'nite'.*'night'"):
        small(tmp_path, styles=["day", "nite"])
    with pytest.raises(KdkitError, match="'tset'"):
        small(tmp_path, "tset")
    with pytest.raises(KdkitError, match="image_size"):
        small(tmp_path, image_size=(8, 64))
    with pytest.raises(KdkitError, match="train_size"):
        small(tmp_path, train_size=0)
    with pytest.raises(KdkitError, match="at least one city"):
        small(tmp_path, city=[])
    assert not list(tmp_path.iterdir())


def test_palette():
    pal = rs.palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert len({tuple(c) for c in pal[: len(rs.CLASSES)]}) == len(rs.CLASSES)
    assert tuple(pal[IGNORE_INDEX]) == (0, 0, 0) and tuple(pal[rs.CLASSES.index("road")]) == (128, 64, 128)
