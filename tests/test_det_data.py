"""Detection data: target padding, the box augmenter, road_boxes, and the COCO / VOC loaders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdkit.data import build_dataset
from kdkit.data import road_boxes as rb
from kdkit.data import road_scenes as rs
from kdkit.data.det_augment import DetectionAugment, letterbox
from kdkit.data.det_base import DetectionTensorDataset, pad_targets, unpad
from kdkit.data.draws import sample_keys
from kdkit.errors import KdkitError

# ---------------------------------------------------------------- targets and the in-memory dataset


def test_pad_targets_and_unpad():
    a = torch.tensor([[1.0, 2, 3, 4, 0], [5, 6, 7, 8, 2]])
    b = torch.zeros(0, 5)
    batch = pad_targets([a, b])
    assert batch.shape == (2, 2, 5) and batch.dtype == torch.float32
    assert torch.equal(batch[0], a) and torch.equal(batch[1], torch.tensor([[0.0, 0, 0, 0, -1]] * 2))
    assert pad_targets([b, b]).shape == (2, 1, 5)  # M is at least 1
    assert pad_targets([a], M=4).shape == (1, 4, 5) and torch.equal(unpad(pad_targets([a], M=4)[0]), a)
    assert unpad(batch[1]).shape == (0, 5)
    with pytest.raises(ValueError, match="more than M=1"):
        pad_targets([a], M=1)


def test_tensor_dataset_contract():
    images = torch.randint(0, 256, (2, 3, 8, 16), dtype=torch.uint8)
    targets = pad_targets([torch.tensor([[1.0, 1, 4, 5, 1]]), torch.zeros(0, 5)])
    ds = DetectionTensorDataset(images, targets, ["a", "b"], (0.5,) * 3, (0.25,) * 3)
    assert ds.task == "detection" and ds.in_memory and ds.num_classes == 2 and len(ds) == 2
    assert ds.labels is targets or torch.equal(ds.labels, targets)
    image, target = ds[0]
    assert torch.equal(image, images[0]) and torch.equal(target, torch.tensor([[1.0, 1, 4, 5, 1]]))
    assert ds[1][1].shape == (0, 5)
    with pytest.raises(ValueError, match="targets must be"):
        DetectionTensorDataset(images, targets[:1], ["a", "b"])


# ---------------------------------------------------------------- augmentation

GREY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _painted(h: int, w: int, boxes: list[list[float]]) -> torch.Tensor:
    """uint8 [3,h,w], black with white boxes (integer corners)."""
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    for x1, y1, x2, y2, *_ in boxes:
        image[:, int(y1) : int(y2), int(x1) : int(x2)] = 255
    return image


def _extent(image: torch.Tensor) -> list[int]:
    """(x1, y1, x2, y2) of the pixels brighter than half."""
    ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_flip_moves_box_corners():
    aug = DetectionAugment(size=(20, 40), **GREY)
    box = [4.0, 2, 10, 8, 1]
    image = aug._normalize.normalize(_painted(20, 40, [box])[None])[0]
    out, target = aug.one(image, torch.tensor([box]), 1.0, torch.tensor([0.0, 0.0]), True, (20, 40))
    assert target.tolist() == [[30.0, 2, 36, 8, 1]]  # x -> 40 - x
    assert _extent(out) == [30, 2, 36, 8]


def test_scale_down_pads_at_the_drawn_position():
    aug = DetectionAugment(size=(20, 40), **GREY)
    box = [4.0, 2, 10, 8, 0]
    image = aug._normalize.normalize(_painted(20, 40, [box])[None])[0]
    out, target = aug.one(image, torch.tensor([box]), 0.5, torch.tensor([0.0, 0.0]), False, (20, 40))
    assert target.tolist() == [[2.0, 1, 5, 4, 0]] and _extent(out) == [2, 1, 5, 4]
    # position 0.99: the 10x20 image sits at the far corner of the 20x40 frame (offset -10, -20)
    out, target = aug.one(image, torch.tensor([box]), 0.5, torch.tensor([0.99, 0.99]), False, (20, 40))
    assert target.tolist() == [[22.0, 11, 25, 14, 0]] and _extent(out) == [22, 11, 25, 14]
    assert out.shape == (3, 20, 40) and float(out[:, :10].abs().sum()) == 0  # the padding is 0


def test_scale_up_crop_clamps_and_drops():
    aug = DetectionAugment(size=(20, 40), min_size=2.0, **GREY)
    boxes = [
        [20.0, 8, 30, 14, 0],  # x2 -> (40,16,60,28), minus the crop corner (20,10): (20,6,40,18)
        [6.0, 2, 14, 8, 1],  # (12,4,28,16) -> (-8,-6,8,6): clamped to (0,0,8,6)
        [2.0, 2, 8, 4, 2],  # (4,4,16,8) -> (-16,-6,-4,-2): left the frame, dropped
        [6.0, 12, 10.5, 18, 2],  # (12,24,21,36) -> (-8,14,1,26): clamped to 1 px wide < min_size, dropped
    ]
    image = aug._normalize.normalize(_painted(20, 40, boxes[:1])[None])[0]
    # crop offset: int(0.5 * (40 - 20 + 1)) = 10 rows, int(0.5 * (80 - 40 + 1)) = 20 columns
    out, target = aug.one(image, torch.tensor(boxes), 2.0, torch.tensor([0.5, 0.5]), False, (20, 40))
    assert target.tolist() == [[20.0, 6, 40, 18, 0], [0, 0, 8, 6, 1]]
    assert _extent(out) == [20, 6, 40, 18]
    # the same with a flip: x -> 40 - x
    out, target = aug.one(image, torch.tensor(boxes), 2.0, torch.tensor([0.5, 0.5]), True, (20, 40))
    assert target.tolist() == [[0.0, 6, 20, 18, 0], [32, 0, 40, 6, 1]] and _extent(out) == [0, 6, 20, 18]


def test_padding_is_the_mean_colour_where_the_box_says_the_image_is_not():
    """A white image with a whole-image box, halved: its pixels (3.0 after normalising) are exactly the
    box, wherever the random position and flip put it; everything else is 0 (the mean colour)."""
    aug = DetectionAugment(size=(20, 40), scale=(0.5, 0.5), mean=(0.4,) * 3, std=(0.2,) * 3)
    images = torch.full((8, 3, 20, 40), 255, dtype=torch.uint8)
    targets = torch.tensor([[[0.0, 0, 40, 20, 0]]]).repeat(8, 1, 1)
    x, y = aug(images, targets, sample_keys(range(8), 0))
    assert len({tuple(t) for t in y[:, 0].tolist()}) > 4  # the positions differ
    for image, target in zip(x, y):
        x1, y1, x2, y2 = (int(v) for v in target[0, :4])
        assert (x2 - x1, y2 - y1) == (20, 10)
        assert torch.allclose(image[:, y1:y2, x1:x2], torch.tensor(3.0))
        image[:, y1:y2, x1:x2] = 0
        assert float(image.abs().max()) == 0


def _batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 24, 32), generator=g, dtype=torch.uint8)
    corner = torch.rand(n, 3, 2, generator=g) * torch.tensor([24.0, 16])
    wh = 2 + torch.rand(n, 3, 2, generator=g) * 6
    cls = torch.randint(0, 3, (n, 3, 1), generator=g).float()
    targets = torch.cat([corner, corner + wh, cls], -1)
    targets[1, 2] = torch.tensor([0.0, 0, 0, 0, -1])  # one padding row
    return images, targets


def test_batch_is_deterministic_and_per_sample():
    aug = DetectionAugment(size=(24, 32), scale=(0.5, 1.5), mean=(0.4,) * 3, std=(0.2,) * 3)
    images, targets = _batch()
    x, y = aug(images, targets, sample_keys(range(6), 3))
    assert x.shape == (6, 3, 24, 32) and x.dtype == torch.float32 and y.shape == (6, 3, 5)
    x2, y2 = aug(images, targets, sample_keys(range(6), 3))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, y3 = aug(images, targets, sample_keys(range(6), 4))
    assert not torch.equal(x, x3)
    # rows 2..4 held by another process, or in another order, get exactly the same views
    xs, ys = aug(images[[3, 2]], targets[[3, 2]], sample_keys([3, 2], 3))
    assert torch.equal(xs, x[[3, 2]]) and torch.equal(ys, y[[3, 2]])
    # valid rows first, padding rows (cls -1) all zero; boxes inside the frame and at least min_size
    for t in y:
        valid = t[:, 4] >= 0
        assert valid[: int(valid.sum())].all()
        assert (t[~valid, :4] == 0).all()
        v = unpad(t)
        assert (v[:, :2] >= 0).all() and (v[:, 2] <= 32).all() and (v[:, 3] <= 24).all()
        assert ((v[:, 2:4] - v[:, :2]) >= 2).all()


def test_list_of_sizes_fits_each_image_to_the_size():
    aug = DetectionAugment(size=(20, 40), flip=False, **GREY)
    small = [4.0, 2, 10, 8, 1]
    big = [8.0, 4, 20, 16, 0]  # a 40x80 image: fitted to 20x40 by a factor 0.5
    images = [_painted(20, 40, [small]), _painted(40, 80, [big])]
    targets = [torch.tensor([small]), torch.tensor([big, [40.0, 4, 60, 16, 2]])]
    x, y = aug(images, targets, sample_keys(range(2), 0))
    assert x.shape == (2, 3, 20, 40) and y.shape == (2, 2, 5)
    assert y[0].tolist() == [small, [0, 0, 0, 0, -1]]
    assert y[1].tolist() == [[4.0, 2, 10, 8, 0], [20, 2, 30, 8, 2]]
    assert _extent(x[1]) == [4, 2, 10, 8]


def test_letterbox():
    image = torch.full((3, 30, 40), 200, dtype=torch.uint8)
    out, scale = letterbox(image, (20, 20))
    assert scale == 0.5 and out.shape == (3, 20, 20) and out.dtype == torch.uint8
    assert (out[:, :15] == 200).all() and (out[:, 15:] == 0).all()  # 15x20, padded at the bottom
    out, scale = letterbox(torch.zeros(3, 10, 10, dtype=torch.uint8), (20, 40))
    assert scale == 2.0 and out.shape == (3, 20, 40)


# ---------------------------------------------------------------- road_boxes

SMALL = dict(train_size=16, test_size=12, image_size=(48, 96))


def test_boxes_are_the_visible_extent_of_the_mask():
    """Every box is tight around pixels of its class, and every such mask pixel lies in a box of it."""
    _, boxes, masks = rb.generate("target", "val", [], 16, (48, 96), 0, min_side=1, min_pixels=1)
    kept = rb.generate("target", "val", [], 16, (48, 96), 0)[1]  # the default rule drops tiny ones
    assert sum(map(len, boxes)) > 40 and sum(map(len, kept)) < sum(map(len, boxes))
    for mask, items, default in zip(masks, boxes, kept):
        covered = np.zeros((len(rb.CLASSES), *mask.shape), bool)
        for x1, y1, x2, y2, k in items.astype(int):
            region = mask[y1:y2, x1:x2] == rb.SCENE_CLASSES[k]
            assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()
            covered[k, y1:y2, x1:x2] = True
        for k, scene_class in enumerate(rb.SCENE_CLASSES):
            assert covered[k][mask == scene_class].all()
        sides = default[:, 2:4] - default[:, :2]
        assert (sides >= rb.MIN_SIDE).all()
        assert {tuple(r) for r in default.tolist()} <= {tuple(r) for r in items.tolist()}


def test_road_boxes_dataset_styles_cache_and_determinism(tmp_path):
    ds = build_dataset("road_boxes", "val", root=str(tmp_path / "a"), styles=["day", "fog"], **SMALL)
    assert isinstance(ds, DetectionTensorDataset) and ds.task == "detection"
    assert ds.classes == ["car", "person", "traffic_sign"] and ds.images.shape == (24, 3, 48, 96)
    assert torch.equal(ds.labels[:12], ds.labels[12:]) and not torch.equal(ds.images[:12], ds.images[12:])
    assert int((ds.labels[..., 4] >= 0).sum()) > 12
    # the pixels of road_scenes with the same parameters
    images, _ = rs.generate("source", "val", ["day"], 12, (48, 96), 0)
    assert np.array_equal(ds.images[:12].numpy(), images["day"])
    assert len(list((tmp_path / "a").glob("v*/source/fog/val.npz"))) == 1
    again = build_dataset("road_boxes", "val", root=str(tmp_path / "b"), styles="fog", **SMALL)
    assert torch.equal(again.images, ds.images[12:]) and torch.equal(again.labels, ds.labels[12:])
    cached = build_dataset("road_boxes", "val", root=str(tmp_path / "a"), styles="fog", **SMALL)
    assert torch.equal(cached.labels, again.labels)
    image, target = ds[0]
    assert target.shape[1] == 5 and (target[:, 4] >= 0).all() and torch.equal(image, ds.images[0])
    with pytest.raises(KdkitError, match="road_boxes has no city 'mars'"):
        build_dataset("road_boxes", "val", root=str(tmp_path / "a"), city="mars", **SMALL)


# ---------------------------------------------------------------- COCO and VOC layouts


def _png(path: Path, h: int, w: int, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def test_coco_layout(tmp_path):
    for i, (h, w) in enumerate([(20, 30), (10, 16), (12, 12)]):
        _png(tmp_path / "images" / "val" / f"{i}.png", h, w, 10 * i)
    data = {
        "images": [{"id": 7, "file_name": "0.png", "height": 20, "width": 30},
                   {"id": 3, "file_name": "1.png", "height": 10, "width": 16},
                   {"id": 9, "file_name": "2.png", "height": 12, "width": 12}],
        "categories": [{"id": 5, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 90, "name": "kite"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [2, 3, 10, 4], "iscrowd": 0, "area": 40},
            {"id": 2, "image_id": 7, "category_id": 90, "bbox": [0.5, 1, 2.5, 3], "iscrowd": 0, "area": 7.5},
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [0, 0, 30, 20], "iscrowd": 1, "area": 600},
            {"id": 4, "image_id": 3, "category_id": 1, "bbox": [4, 4, 8, 2], "iscrowd": 0, "area": 16},
        ],
    }  # fmt: skip
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(data))
    ds = build_dataset("coco", "val", root=str(tmp_path))
    assert ds.task == "detection" and not ds.in_memory and len(ds) == 3
    assert ds.classes == ["person", "dog", "kite"]  # by COCO id 1, 5, 90 -> 0, 1, 2
    image, target = ds[0]  # image id 3 (sorted ids), 1.png
    assert image.shape == (3, 10, 16) and image.dtype == torch.uint8 and int(image[0, 0, 0]) == 10
    assert target.tolist() == [[4.0, 4, 12, 6, 0]]
    image, target = ds[1]  # image id 7: crowd box skipped, xywh -> xyxy
    assert image.shape == (3, 20, 30) and target.tolist() == [[2.0, 3, 12, 7, 1], [0.5, 1, 3, 4, 2]]
    assert ds[2][1].shape == (0, 5)
    assert len(build_dataset("coco", "val", root=str(tmp_path), limit=2)) == 2
    with pytest.raises(KdkitError, match=r"instances_train\.json; expected <root>/annotations"):
        build_dataset("coco", "train", root=str(tmp_path))
    with pytest.raises(KdkitError, match="no image folder"):
        (tmp_path / "annotations" / "instances_test.json").write_text(json.dumps(data))
        build_dataset("coco", "test", root=str(tmp_path))
    data["annotations"][0]["category_id"] = 4
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(data))
    with pytest.raises(KdkitError, match="has category 4, which is not in its 'categories'"):
        build_dataset("coco", "val", root=str(tmp_path))
    (tmp_path / "images" / "val" / "0.png").unlink()
    with pytest.raises(KdkitError, match="lists image 0.png"):
        build_dataset("coco", "val", root=str(tmp_path))


VOC_XML = """<annotation><size><width>{w}</width><height>{h}</height></size>{objects}</annotation>"""
VOC_OBJECT = (
    "<object><name>{name}</name><difficult>{difficult}</difficult>"
    "<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
)


def _voc(root: Path, items: dict[str, list[tuple[str, int, tuple[int, int, int, int]]]]) -> None:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, objects in items.items():
        Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        xml = "".join(VOC_OBJECT.format(name=n, difficult=d, b=b) for n, d, b in objects)
        (root / "Annotations" / f"{image_id}.xml").write_text(VOC_XML.format(w=24, h=16, objects=xml))
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(items) + "\n")


def test_voc_detection_layout(tmp_path):
    year = tmp_path / "VOCdevkit" / "VOC2007"
    _voc(year, {
        "000002": [("car", 0, (1, 1, 24, 16)), ("person", 1, (3, 4, 5, 9))],
        "000001": [("tvmonitor", 0, (2, 3, 10, 12)), ("aeroplane", 0, (5, 5, 6, 6))],
    })  # fmt: skip
    ds = build_dataset("voc_detection", "val", root=str(tmp_path))
    assert ds.task == "detection" and ds.num_classes == 20 and ds.classes[0] == "aeroplane" and len(ds) == 2
    image, target = ds[0]  # 000001 first (sorted ids); 1-based inclusive -> (xmin - 1, ymin - 1, xmax, ymax)
    assert image.shape == (3, 16, 24) and target.tolist() == [[1.0, 2, 10, 12, 19], [4, 4, 6, 6, 0]]
    assert ds[1][1].tolist() == [[0.0, 0, 24, 16, 6]]  # the whole image; the difficult person skipped
    kept = build_dataset("voc_detection", "val", root=str(year), keep_difficult=True)
    assert kept[1][1].tolist() == [[0.0, 0, 24, 16, 6], [2, 3, 5, 9, 14]]
    with pytest.raises(KdkitError, match="no split file .*train.txt; expected <root>/Annotations"):
        build_dataset("voc_detection", "train", root=str(tmp_path))
    with pytest.raises(KdkitError, match="no Annotations folder"):
        build_dataset("voc_detection", "val", root=str(tmp_path / "nowhere"))
    _voc(year, {"000003": [("unicorn", 0, (1, 1, 2, 2))]})
    with pytest.raises(KdkitError, match="'unicorn', not one of the 20 VOC classes"):
        build_dataset("voc_detection", "val", root=str(tmp_path))
