"""Segmentation presets: every file validates, the I2CKD rows use the paper's schedule and Eq. 4
weights, and the Spirit Distillation presets train the parts Algorithm 1 says, with Sec. V.C.2's
optimisers."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdkit.config import _read_yaml, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "kdkit" / "configs"
DATASETS = {"cityscapes": (512, 1024), "voc": (512, 512), "camvid": (360, 360)}
I2CKD_ROWS = [(d, s, m) for d in DATASETS for s in ("deeplabv3_resnet18", "pspnet_resnet18") for m in
              ("baseline", "cwd", "i2ckd")]  # fmt: skip
TERMS = {
    "baseline": [("ce", 1.0, {})],
    "cwd": [("ce", 1.0, {}), ("cwd", 3.0, {"temperature": 4.0})],
    "i2ckd": [("ce", 1.0, {}), ("cwd", 3.0, {"temperature": 2.0}), ("i2ckd", 0.6, {})],
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("w") / "teacher.safetensors"
    path.write_bytes(b"")  # validation only checks that the file exists
    return path


def load(path: Path, weights: Path):
    return load_config(path, [f"teacher.weights={weights}"] if "teacher" in _read_yaml(path) else [])


@pytest.mark.parametrize("dataset,student,method", I2CKD_ROWS)
def test_i2ckd_rows_follow_the_paper(dataset, student, method, weights):
    config = load(CONFIGS / dataset / student / f"{method}.yaml", weights)
    assert config.task == "segmentation" and config.data.name == dataset
    assert config.data.batch_size == 16 and config.data.augment.crop == DATASETS[dataset]
    assert config.data.augment.scale == (0.5, 2.0) and config.data.augment.flip
    (stage,) = config.stages
    assert stage.steps == 40000 and (stage.optimizer.name, stage.optimizer.lr, stage.optimizer.momentum) == (
        "sgd", 0.02, 0.9)  # fmt: skip
    assert (stage.schedule.name, stage.schedule.power) == ("poly", 0.9)
    assert [(t.name, t.weight, t.params) for t in config.terms] == TERMS[method]
    assert config.student.name == student
    if method != "baseline":
        assert config.teacher.name == "deeplabv3_resnet101"
        teacher_run = load(CONFIGS / dataset / "teacher_deeplabv3_resnet101.yaml", weights)
        raw = _read_yaml(CONFIGS / dataset / student / f"{method}.yaml")
        assert Path(raw["teacher"]["weights"]) == Path(teacher_run.runtime.out_dir) / teacher_run.name / (
            "student.safetensors")  # fmt: skip


@pytest.mark.parametrize("folder", ["cityscapes/spirit", "demo_segmentation"])
def test_spirit_presets_follow_algorithm_1(folder, weights):
    sd = load(CONFIGS / folder / "sd.yaml", weights)
    esd = load(CONFIGS / folder / "esd.yaml", weights)
    alone = load(
        CONFIGS / folder / ("student.yaml" if folder.startswith("city") else "spirit_student.yaml"), weights
    )
    assert sd.student == alone.student and sd.student.name == "spirit"
    for config in (sd, esd):
        imitation, head, finetune = config.stages
        assert imitation.train == ["extractor.*"] and [t.name for t in imitation.terms] == ["spirit"]
        assert head.train == ["head.*"] and [t.name for t in head.terms] == ["ce"]
        assert finetune.train == ["*"] and [t.name for t in finetune.terms] == ["ce"]
        optimisers = [(s.optimizer.lr, s.optimizer.momentum, s.optimizer.weight_decay) for s in config.stages]
        assert optimisers == [(3e-3, 0.99, 3e-3), (1e-2, 0.9, 3e-3), (5e-5, 0.99, 3e-3)]
    assert esd.stages[0].data.mix is not None and sd.stages[0].data is None
    assert esd.stages[0].steps == sd.stages[0].steps  # SD and ESD imitate for the same number of steps
    assert esd.stages[1:] == sd.stages[1:]


def test_tst_table_4_preset(weights):
    config = load(CONFIGS / "cityscapes" / "pspnet_resnet18" / "tst.yaml", weights)
    assert (config.teacher.name, config.student.name) == ("pspnet_resnet101", "pspnet_resnet18")
    assert [(t.name, t.weight, t.params) for t in config.terms] == [
        ("ce", 1.0, {}),
        ("kd", 1.0, {"temperature": 4.0}),
    ]
    (refiner,) = config.refiners
    assert refiner.name == "tst" and refiner.params["num_ops"] == 4 and refiner.update.every == 8
    teacher_run = load(CONFIGS / "cityscapes" / "teacher_pspnet_resnet101.yaml", weights)
    raw = _read_yaml(CONFIGS / "cityscapes" / "pspnet_resnet18" / "tst.yaml")
    assert Path(raw["teacher"]["weights"]) == Path(teacher_run.runtime.out_dir) / teacher_run.name / (
        "student.safetensors")  # fmt: skip


def test_cityscapes_64_is_the_first_64_aachen_images_road_vs_background(weights):
    config = load(CONFIGS / "cityscapes" / "spirit" / "sd.yaml", weights)
    assert config.data.params["cities"] == ["aachen"] and config.data.params["limit"] == 64
    assert config.data.params["keep"] == ["road"]
    assert config.teacher.name == "torchvision:deeplabv3_resnet50" and config.teacher.num_classes == 21


def test_every_segmentation_preset_validates_and_is_commented(weights):
    files = [p for d in (*DATASETS, "demo_segmentation") for p in sorted((CONFIGS / d).rglob("*.yaml"))]
    assert len(files) > 25
    for path in files:
        assert path.read_text().startswith("# "), path
        if path.name != "base.yaml":
            assert load(path, weights).task == "segmentation", path
