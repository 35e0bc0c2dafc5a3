"""Data layer: embedded generator and cache, image folders, CIFAR folders, batch augmentation."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdkit.data import BatchAugment, build_dataset
from kdkit.data import embedded as emb
from kdkit.data.draws import SampleKeys, sample_keys
from kdkit.errors import KdkitError
from kdkit.registry import UnknownNameError

SMALL = dict(num_classes=10, train_size=200, test_size=100, image_size=32)


def small(tmp_path: Path, split: str = "train", **params) -> emb.ImageDataset:
    return build_dataset("embedded", split, root=str(tmp_path), **{**SMALL, **params})


# ---------------------------------------------------------------- embedded


def test_embedded_contract(tmp_path):
    ds = small(tmp_path)
    assert ds.in_memory and len(ds) == 200 and ds.num_classes == 10
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (200, 3, 32, 32)
    assert ds.labels.dtype == torch.int64
    image, label = ds[3]
    assert torch.equal(image, ds.images[3]) and label == int(ds.labels[3])
    assert "striped-circle" in ds.classes and ds.classes == sorted(ds.classes)
    assert all(0 < m < 1 for m in ds.mean) and all(0 < s < 1 for s in ds.std)
    assert torch.bincount(ds.labels, minlength=10).tolist() == [20] * 10


def test_embedded_deterministic(tmp_path):
    a = small(tmp_path / "a", "test")
    b = small(tmp_path / "b", "test")
    c = small(tmp_path / "c", "test", seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    png = next((tmp_path / "a").glob("*/day/test/*/*.png"))
    assert png.read_bytes() == (tmp_path / "b" / png.relative_to(tmp_path / "a")).read_bytes()
    train = small(tmp_path / "a", "train")
    assert not torch.equal(train.images[:100], a.images)


def test_embedded_styles_share_content(tmp_path):
    both, labels = emb.generate("test", ["day", "fog"], 60, 10, 32, seed=0)
    day_only, day_labels = emb.generate("test", ["day"], 60, 10, 32, seed=0)
    fog_only, _ = emb.generate("test", ["fog"], 60, 10, 32, seed=0)
    assert np.array_equal(labels, day_labels)
    assert np.array_equal(both["day"], day_only["day"]) and np.array_equal(both["fog"], fog_only["fog"])
    assert not np.array_equal(both["day"], both["fog"])
    rendered = small(tmp_path, "test", styles=list(emb.STYLES))
    n = len(rendered) // len(emb.STYLES)
    per_style = rendered.images.view(len(emb.STYLES), n, 3, 32, 32).float()
    assert torch.equal(
        rendered.labels.view(len(emb.STYLES), n), rendered.labels[:n].expand(len(emb.STYLES), n)
    )
    for k in range(1, len(emb.STYLES)):
        assert (per_style[k] - per_style[0]).abs().mean() > 5, emb.STYLES


def test_embedded_reuses_cache(tmp_path, monkeypatch):
    small(tmp_path, "test")
    (npz,) = tmp_path.glob("*/day/test/tensors.npz")
    stamp = npz.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(emb, "generate", lambda *a, **k: calls.append(a) or pytest.fail("regenerated"))
    again = small(tmp_path, "test")
    assert len(again) == 100 and npz.stat().st_mtime_ns == stamp and not calls
    monkeypatch.undo()
    small(tmp_path, "test", image_size=16)  # other parameters: another directory
    assert len(list(tmp_path.glob("*/day/test/tensors.npz"))) == 2
    assert not list(tmp_path.glob("*/day/.*")), "temp dirs left behind"


def test_embedded_tree_reads_as_image_folder(tmp_path):
    ds = small(tmp_path, "test")
    (style_dir,) = tmp_path.glob("*/day")
    folder = build_dataset("image_folder", "test", root=str(style_dir))
    assert folder.classes == ds.classes and not folder.in_memory
    order = torch.tensor([int(f.stem) for f in folder.files])
    assert torch.equal(folder.labels, ds.labels[order])
    for i in (0, 17, 99):
        image, label = folder[i]
        assert torch.equal(image, ds.images[order[i]]) and label == int(ds.labels[order[i]])


def test_embedded_bad_params(tmp_path):
    with pytest.raises(KdkitError, match="did you mean 'rain'"):
        small(tmp_path, styles=["rainy"])
    with pytest.raises(KdkitError, match="no split 'tset'"):
        small(tmp_path, "tset")
    with pytest.raises(KdkitError, match="no parameter 'num_class'"):
        build_dataset("embedded", "train", num_class=3)
    with pytest.raises(UnknownNameError, match="embedded"):
        build_dataset("embeded", "train")


# ---------------------------------------------------------------- image folders


def write_image(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_image(tmp_path / "train" / "cat" / "a.png", (12, 10), (255, 0, 0))
    write_image(tmp_path / "train" / "cat" / "b.bmp", (10, 10), (0, 255, 0))
    write_image(tmp_path / "train" / "dog" / "c.png", (20, 30), (0, 0, 255))
    write_image(tmp_path / "test" / "dog" / "d.png", (8, 8), (9, 9, 9))
    return tmp_path


def test_image_folder_loads(folder):
    for cache in (False, True):
        ds = build_dataset("image_folder", "train", root=str(folder), image_size=8, cache=cache)
        assert ds.in_memory == cache and ds.classes == ["cat", "dog"] and len(ds) == 3
        assert [ds[i][1] for i in range(3)] == [0, 0, 1]
        assert all(ds[i][0].shape == (3, 8, 8) and ds[i][0].dtype == torch.uint8 for i in range(3))
        assert ds[2][0][:, 4, 4].tolist() == [0, 0, 255]
    test = build_dataset("image_folder", "test", root=str(folder))
    assert test.classes == ["cat", "dog"] and test[0][1] == 1  # class indices agree across splits
    assert test.mean == pytest.approx((9 / 255,) * 3) and test.std == pytest.approx((0.0,) * 3)


def test_image_folder_without_split_dirs(tmp_path):
    write_image(tmp_path / "a" / "x.jpg", (6, 6), (10, 20, 30))
    write_image(tmp_path / "b" / "y.webp", (6, 6), (10, 20, 30))
    ds = build_dataset("image_folder", "val", root=str(tmp_path), cache=True, mean=(0.5,) * 3, std=(0.2,) * 3)
    assert ds.classes == ["a", "b"] and ds.labels.tolist() == [0, 1] and ds.mean == (0.5,) * 3


def test_image_folder_errors(folder, tmp_path):
    with pytest.raises(KdkitError, match="does not exist.*<root>/<split>/<class>"):
        build_dataset("image_folder", "train", root=str(tmp_path / "nope"))
    with pytest.raises(KdkitError, match="no 'val' folder"):
        build_dataset("image_folder", "val", root=str(folder))
    with pytest.raises(KdkitError, match="different sizes.*image_size"):
        build_dataset("image_folder", "train", root=str(folder), cache=True)
    bad = folder / "train" / "dog" / "z.png"
    bad.write_bytes(b"not an image")
    ds = build_dataset("image_folder", "train", root=str(folder), image_size=8, mean=(0,) * 3, std=(1,) * 3)
    with pytest.raises(KdkitError, match=f"{bad}.*remove or fix"):
        ds[3]
    with pytest.raises(KdkitError, match="z.png"):
        build_dataset("image_folder", "train", root=str(folder), image_size=8, cache=True)
    empty = tmp_path / "empty"
    (empty / "train" / "cls").mkdir(parents=True)
    with pytest.raises(KdkitError, match="no images"):
        build_dataset("image_folder", "train", root=str(empty))


# ---------------------------------------------------------------- CIFAR


def fake_cifar(root: Path, folder: str, files: list[str], meta: tuple[str, str, list[str]], key: str) -> None:
    base = root / folder
    base.mkdir(parents=True)
    for k, name in enumerate(files):
        data = np.full((2, 3072), k, np.uint8)
        data[1, :1024] = 200  # red channel of the second image
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, key: [k % 2, 1]}, f)
    with open(base / meta[0], "wb") as f:
        pickle.dump({meta[1]: meta[2]}, f)


def test_cifar10_fake_folder(tmp_path):
    train = [f"data_batch_{i}" for i in range(1, 6)]
    fake_cifar(
        tmp_path,
        "cifar-10-batches-py",
        [*train, "test_batch"],
        ("batches.meta", "label_names", ["a", "b"]),
        "labels",
    )
    ds = build_dataset("cifar10", "train", root=str(tmp_path))
    assert ds.in_memory and ds.images.shape == (10, 3, 32, 32) and ds.classes == ["a", "b"]
    assert ds.labels.tolist() == [0, 1, 1, 1, 0, 1, 1, 1, 0, 1]
    assert ds.images[1, 0].unique().tolist() == [200] and ds.images[1, 1].unique().tolist() == [0]
    assert ds.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    assert len(build_dataset("cifar10", "test", root=str(tmp_path))) == 2


def test_cifar100_fake_folder_and_missing(tmp_path):
    fake_cifar(
        tmp_path,
        "cifar-100-python",
        ["train", "test"],
        ("meta", "fine_label_names", ["x", "y"]),
        "fine_labels",
    )
    ds = build_dataset("cifar100", "test", root=str(tmp_path))
    assert len(ds) == 2 and ds.classes == ["x", "y"] and ds.labels.tolist() == [1, 1]
    with pytest.raises(KdkitError, match="cifar-10-batches-py.*point root.*download=true"):
        build_dataset("cifar10", "train", root=str(tmp_path))


# ---------------------------------------------------------------- augmentation


def _keys(count: int, *base: object) -> SampleKeys:
    return sample_keys(range(count), *base)


def test_sample_keys_are_blake2b_of_base_and_index():
    u = sample_keys([3, 0], "augment", 7, 0, 2).uniform(2)
    digest = hashlib.blake2b(repr(("augment", 7, 0, 2, 3)).encode(), digest_size=16).digest()
    by_hand = [(int.from_bytes(digest[k : k + 8], "little") >> 11) / 2**53 for k in (0, 8)]
    assert u.dtype == torch.float64 and u.shape == (2, 2) and u[0].tolist() == by_hand
    assert ((u >= 0) & (u < 1)).all() and u[0, 0] != u[1, 0]


def test_augment_deterministic_and_per_sample():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    aug = BatchAugment(crop_padding=2, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    first = aug(images, _keys(16, 7))
    assert first.dtype == torch.float32 and first.shape == images.shape
    assert torch.equal(first, aug(images, _keys(16, 7)))
    assert not torch.equal(first, aug(images, _keys(16, 8)))
    # a sample's view depends on its index only: another batch, another position, the same image
    picked = torch.tensor([11, 2, 5])
    assert torch.equal(aug(images[picked], sample_keys(picked, 7)), first[picked])
    with pytest.raises(ValueError, match="3 images but 2 sample keys"):
        aug(images[:3], _keys(2, 7))


def test_augment_flip_reverses_rows():
    image = torch.tensor([[[[1, 2, 3], [4, 5, 6]]]], dtype=torch.uint8)  # [1,1,2,3]
    aug = BatchAugment(crop_padding=0, mean=(0.0,), std=(1 / 255,))  # output = pixel values
    seen = set()
    for seed in range(20):
        out = aug(image, _keys(1, seed)).round()
        assert out.tolist() in ([[[[1, 2, 3], [4, 5, 6]]]], [[[[3, 2, 1], [6, 5, 4]]]])
        seen.add(out[0, 0, 0, 0].item())
    assert seen == {1.0, 3.0}
    no_flip = BatchAugment(crop_padding=0, flip=False, mean=(0.0,), std=(1 / 255,))
    out = no_flip(image.expand(8, 1, 2, 3), _keys(8, 0))
    assert torch.allclose(out, image.float().expand(8, 1, 2, 3))  # padding 0, no flip: identity


def test_augment_crop_is_a_shifted_window():
    images = torch.randint(1, 256, (32, 3, 5, 5), dtype=torch.uint8)
    aug = BatchAugment(crop_padding=1, flip=False, mean=(0.0,) * 3, std=(1 / 255,) * 3)
    out = aug(images, _keys(32, 0))
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1)).float()
    shifts = set()
    for b in range(32):
        hits = [
            (i, j)
            for i in range(3)
            for j in range(3)
            if torch.allclose(out[b], padded[b, :, i : i + 5, j : j + 5], atol=1e-3)
        ]
        assert len(hits) == 1
        shifts.add(hits[0])
    assert len(shifts) > 4  # per-sample offsets


def test_augment_normalize_by_hand():
    aug = BatchAugment(mean=(0.5, 0.0, 1.0), std=(0.25, 0.5, 2.0))
    images = torch.tensor([255, 51, 0], dtype=torch.uint8).view(1, 3, 1, 1)
    assert aug.normalize(images).flatten().tolist() == pytest.approx([2.0, 0.4, -0.5])
    assert aug.normalize(images.float() / 255).flatten().tolist() == pytest.approx([2.0, 0.4, -0.5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_cpu_generator_cuda_batch():
    images = torch.randint(0, 256, (8, 3, 6, 6), dtype=torch.uint8)
    aug = BatchAugment(crop_padding=2)
    on_cpu = aug(images, _keys(8, 3))
    on_gpu = aug(images.cuda(), _keys(8, 3))
    assert on_gpu.is_cuda and torch.allclose(on_gpu.cpu(), on_cpu)
