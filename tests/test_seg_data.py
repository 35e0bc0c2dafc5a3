"""Segmentation datasets read from tiny on-the-fly copies of their on-disk layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdkit.data import build_dataset
from kdkit.data.cityscapes import CLASSES as CITYSCAPES_CLASSES
from kdkit.data.cityscapes import LABEL_TO_TRAIN_ID, train_id_lut
from kdkit.errors import KdkitError
from kdkit.registry import DATASETS

H, W = 8, 16


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def write_mask(path: Path, values: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(values.astype(np.uint8), mode="L")
    if palette:
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


def stripes(*values: int) -> np.ndarray:
    """An HxW mask whose columns cycle through ``values``."""
    return np.array(values, dtype=np.uint8)[np.arange(W) % len(values)][None].repeat(H, 0)


def seg_folder(root: Path, n: int = 3, split: str = "train") -> Path:
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("sky\nroad\ncar\n")
    for i in range(n):
        write_image(root / "images" / split / f"img{i}.png", i)
        write_mask(root / "masks" / split / f"img{i}.png", stripes(0, 1, 2, 255))
    return root


def cityscapes_root(root: Path) -> Path:
    label_ids = stripes(7, 8, 11, 26, 33, 0, 6, 5)
    for city, n in (("aachen", 3), ("bochum", 2)):
        for i in range(n):
            stem = f"{city}_{i:06d}_000019"
            write_image(root / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png", i)
            write_mask(root / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png", label_ids)
    return root


def voc_root(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    ids = ["2007_000032", "2007_000033", "2008_000002"]
    for i, image_id in enumerate(ids):
        write_image(voc / "JPEGImages" / f"{image_id}.jpg", i)
        write_mask(voc / "SegmentationClass" / f"{image_id}.png", stripes(0, 15, 20, 255), palette=True)
        write_mask(voc / "SegmentationClassAug" / f"{image_id}.png", stripes(0, 1, 255))
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(ids[:2]) + "\n")
    (sets / "val.txt").write_text(ids[2] + "\n")
    (sets / "train_aug.txt").write_text(
        "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids)
    )
    return root


def camvid_root(root: Path) -> Path:
    for i in range(2):
        write_image(root / "train" / f"0001TP_{i:06d}.png", i)
        write_mask(root / "trainannot" / f"0001TP_{i:06d}.png", stripes(0, 3, 10, 11))
    return root


def test_registered() -> None:
    for name in ("segmentation_folder", "unlabeled_folder", "cityscapes", "voc", "camvid"):
        assert name in DATASETS


def test_segmentation_folder_items(tmp_path: Path) -> None:
    root = seg_folder(tmp_path)
    write_image(root / "images" / "train" / "img9.jpg", 9)
    write_mask(root / "masks" / "train" / "img9.png", stripes(2))
    ds = build_dataset("segmentation_folder", "train", root=str(root))
    assert len(ds) == 4 and ds.classes == ["sky", "road", "car"] and ds.num_classes == 3
    assert ds.task == "segmentation" and not ds.in_memory and ds.mean == (0.485, 0.456, 0.406)
    image, mask = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, H, W)
    assert mask.dtype == torch.uint8 and mask.shape == (H, W)
    assert torch.equal(mask, torch.from_numpy(stripes(0, 1, 2, 255)))
    assert torch.equal(ds[3][1], torch.full((H, W), 2, dtype=torch.uint8))
    assert len(build_dataset("segmentation_folder", "train", root=str(root), limit=2)) == 2


def test_segmentation_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(KdkitError, match="classes.txt"):
        build_dataset("segmentation_folder", "train", root=str(tmp_path / "nowhere"))
    root = seg_folder(tmp_path / "data")
    with pytest.raises(KdkitError, match="no split 'tarin'.*did you mean 'train'"):
        build_dataset("segmentation_folder", "tarin", root=str(root))
    with pytest.raises(KdkitError, match=r"images/val.*expected <root>/images"):
        build_dataset("segmentation_folder", "val", root=str(root))
    (root / "images" / "test").mkdir()
    with pytest.raises(KdkitError, match="no images in .*images/test"):
        build_dataset("segmentation_folder", "test", root=str(root))
    with pytest.raises(KdkitError, match="limit"):
        build_dataset("segmentation_folder", "train", root=str(root), limit=0)

    (root / "masks" / "train" / "img1.png").unlink()
    with pytest.raises(KdkitError, match=r"img1\.png has no mask: expected .*masks/train/img1\.png"):
        build_dataset("segmentation_folder", "train", root=str(root))

    write_mask(root / "masks" / "train" / "img1.png", np.zeros((4, 4)))
    (root / "images" / "train" / "img2.png").write_bytes(b"not a png")
    ds = build_dataset("segmentation_folder", "train", root=str(root))
    with pytest.raises(KdkitError, match=r"mask .*img1\.png is 4x4 \(HxW\) but its image is 8x16"):
        ds[1]
    with pytest.raises(KdkitError, match=r"cannot read image .*img2\.png"):
        ds[2]
    (root / "masks" / "train" / "img0.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(KdkitError, match=r"cannot read mask .*img0\.png"):
        ds[0]
    write_mask(root / "masks" / "train" / "img0.png", stripes(0, 1, 7))
    with pytest.raises(KdkitError, match=r"mask .*img0\.png holds value 7"):
        ds[0]
    Image.new("RGB", (W, H)).save(root / "masks" / "train" / "img0.png")
    with pytest.raises(KdkitError, match=r"mask .*img0\.png has mode RGB"):
        ds[0]


def test_unlabeled_folder(tmp_path: Path) -> None:
    write_image(tmp_path / "a" / "x.png", 0)
    write_image(tmp_path / "b" / "deep" / "y.jpg", 1, size=(12, 10))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = build_dataset("unlabeled_folder", "train", root=str(tmp_path))
    assert len(ds) == 2 and ds.classes == []
    (im0, m0), (im1, m1) = ds[0], ds[1]
    assert im0.shape == (3, H, W) and im1.shape == (3, 12, 10)
    assert m0.shape == (H, W) and m1.shape == (12, 10) and bool((m1 == 255).all()) and bool((m0 == 255).all())
    ds = build_dataset("unlabeled_folder", "val", root=str(tmp_path), classes=["a", "b"], resize=[4, 6])
    assert ds.num_classes == 2 and ds[1][0].shape == (3, 4, 6) and ds[1][1].shape == (4, 6)

    split_root = tmp_path / "split"
    write_image(split_root / "train" / "z.png", 2)
    assert len(build_dataset("unlabeled_folder", "train", root=str(split_root))) == 1
    with pytest.raises(KdkitError, match="no 'val' folder"):
        build_dataset("unlabeled_folder", "val", root=str(split_root))
    with pytest.raises(KdkitError, match="does not exist"):
        build_dataset("unlabeled_folder", "train", root=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdkitError, match="no images in .*empty"):
        build_dataset("unlabeled_folder", "train", root=str(tmp_path / "empty"))


def test_cityscapes_table() -> None:
    assert len(CITYSCAPES_CLASSES) == 19
    assert CITYSCAPES_CLASSES[:3] == ["road", "sidewalk", "building"]
    assert CITYSCAPES_CLASSES[-1] == "bicycle" and CITYSCAPES_CLASSES[13] == "car"
    expected = {7: 0, 8: 1, 11: 2, 26: 13, 33: 18, 0: 255, 6: 255, 9: 255, 29: 255, 31: 16, -1: 255}
    assert {k: LABEL_TO_TRAIN_ID[k] for k in expected} == expected
    lut = train_id_lut()
    assert lut.dtype == torch.uint8 and lut.shape == (256,)
    assert lut[255] == 255 and lut[7] == 0 and lut[33] == 18
    assert sorted(v for v in set(LABEL_TO_TRAIN_ID.values()) if v != 255) == list(range(19))


def test_cityscapes(tmp_path: Path) -> None:
    root = cityscapes_root(tmp_path)
    ds = build_dataset("cityscapes", "train", root=str(root))
    assert len(ds) == 5 and ds.num_classes == 19 and ds.std == (0.229, 0.224, 0.225)
    assert ds.items[0][0].name == "aachen_000000_000019_leftImg8bit.png"
    image, mask = ds[0]
    assert image.shape == (3, H, W) and mask.dtype == torch.uint8
    assert mask[0, :8].tolist() == [0, 1, 2, 13, 18, 255, 255, 255]

    # Spirit Distillation's binary task: road vs every other labelled class; unlabelled stays 255
    binary = build_dataset("cityscapes", "train", root=str(root), keep=["road"])
    assert binary.classes == ["background", "road"]
    assert binary[0][1][0, :8].tolist() == [1, 0, 0, 0, 0, 255, 255, 255]
    with pytest.raises(KdkitError, match="unknown classes"):
        build_dataset("cityscapes", "train", root=str(root), keep=["roads"])

    aachen = build_dataset("cityscapes", "train", root=str(root), cities=["aachen"], limit=2)
    assert [p.parent.name for p, _ in aachen.items] == ["aachen", "aachen"]
    assert len(build_dataset("cityscapes", "train", root=str(root), cities=["bochum"])) == 2

    half = build_dataset("cityscapes", "train", root=str(root), resize=[4, 8])
    image, mask = half[0]
    assert image.shape == (3, 4, 8) and image.dtype == torch.uint8 and mask.shape == (4, 8)
    assert set(mask.unique().tolist()) <= {0, 1, 2, 13, 18, 255}
    up = build_dataset("cityscapes", "train", root=str(root), resize=[13, 29])[0][1]
    assert up.shape == (13, 29) and set(up.unique().tolist()) == {0, 1, 2, 13, 18, 255}

    with pytest.raises(KdkitError, match="no cities paris.*found: aachen, bochum"):
        build_dataset("cityscapes", "train", root=str(root), cities=["paris"])
    with pytest.raises(KdkitError, match=r"leftImg8bit/val; expected <root>/leftImg8bit"):
        build_dataset("cityscapes", "val", root=str(root))
    with pytest.raises(KdkitError, match="no split 'training'"):
        build_dataset("cityscapes", "training", root=str(root))
    with pytest.raises(KdkitError, match="resize"):
        build_dataset("cityscapes", "train", root=str(root), resize=[4])
    missing = root / "gtFine" / "train" / "bochum" / "bochum_000001_000019_gtFine_labelIds.png"
    missing.unlink()
    with pytest.raises(KdkitError, match=r"bochum_000001_000019_leftImg8bit\.png has no mask"):
        build_dataset("cityscapes", "train", root=str(root))
    write_mask(missing, stripes(7, 40))
    with pytest.raises(KdkitError, match=r"bochum_000001_000019_gtFine_labelIds\.png holds value 40"):
        build_dataset("cityscapes", "train", root=str(root))[4]


def test_voc(tmp_path: Path) -> None:
    root = voc_root(tmp_path)
    with Image.open(root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000032.png") as im:
        assert im.mode == "P"
    for base in (root, root / "VOCdevkit" / "VOC2012"):
        ds = build_dataset("voc", "train", root=str(base))
        assert len(ds) == 2 and ds.num_classes == 21 and ds.classes[0] == "background"
    image, mask = ds[1]
    assert image.shape == (3, H, W) and mask.shape == (H, W) and mask.dtype == torch.uint8
    assert mask[0, :4].tolist() == [0, 15, 20, 255]
    assert len(build_dataset("voc", "val", root=str(root))) == 1

    aug = build_dataset("voc", "train", root=str(root), augmented=True)
    assert len(aug) == 3 and aug.items[2][1].parent.name == "SegmentationClassAug"
    assert aug[2][1][0, :3].tolist() == [0, 1, 255]

    with pytest.raises(KdkitError, match=r"no split file .*trainval\.txt"):
        build_dataset("voc", "trainval", root=str(root))
    with pytest.raises(KdkitError, match="no split 'test'"):
        build_dataset("voc", "test", root=str(root))
    with pytest.raises(KdkitError, match="no JPEGImages folder"):
        build_dataset("voc", "train", root=str(tmp_path / "nowhere"))


def test_camvid(tmp_path: Path) -> None:
    root = camvid_root(tmp_path)
    ds = build_dataset("camvid", "train", root=str(root))
    assert len(ds) == 2 and ds.num_classes == 11 and ds.classes[0] == "Sky" and ds.classes[-1] == "Bicyclist"
    image, mask = ds[0]
    assert image.shape == (3, H, W) and mask.shape == (H, W)
    assert mask[0, :4].tolist() == [0, 3, 10, 255]
    assert len(build_dataset("camvid", "train", root=str(root), limit=1)) == 1
    with pytest.raises(KdkitError, match=r"camvid: no folder .*val; expected"):
        build_dataset("camvid", "val", root=str(root))
    write_mask(root / "trainannot" / "0001TP_000001.png", stripes(12))
    with pytest.raises(KdkitError, match=r"0001TP_000001\.png holds value 12"):
        ds[1]
