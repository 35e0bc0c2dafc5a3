"""COCO detection presets (configs/coco): SoKD Table 4 and TST Table 3 rows that torchvision can build.
Every file validates, names only zoo detectors built at one input size, follows its paper's schedule
(detectron2 1x/3x in iterations for SoKD, mmdetection 2x/1x in epochs for TST) and its row's terms; the
teacher presets export the files the distillation presets load; the FitNet + SoKD and KD + mimic terms
find and bind their taps on the real models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kdkit.data  # noqa: F401  (registers the datasets)
import kdkit.refiners  # noqa: F401  (registers the refiners)
import kdkit.terms  # noqa: F401  (registers the terms)
from kdkit.config import _read_yaml, load_config
from kdkit.deploy.export import WEIGHTS
from kdkit.engine.build import run_directory
from kdkit.models import build_model
from kdkit.models.detection import DET_MODELS
from kdkit.registry import REFINERS, TERMS
from kdkit.taps import dry_run

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

PRESETS = Path(__file__).resolve().parents[1] / "src" / "kdkit" / "configs" / "coco"
ALL_YAML = sorted(PRESETS.rglob("*.yaml"))
RUNNABLE = [p for p in ALL_YAML if p.name != "base.yaml"]

SOKD_PAIRS = {  # SoKD Table 4's three pairs: (teacher, student)
    "r101_r18": ("fasterrcnn_resnet101_fpn", "fasterrcnn_resnet18_fpn"),
    "r101_r50": ("fasterrcnn_resnet101_fpn", "fasterrcnn_resnet50_fpn"),
    "r50_mv2": ("fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v2_fpn"),
}
SOKD_METHODS = ("fitnet", "fitnet_sokd", "reviewkd", "reviewkd_sokd")
TST_PAIRS = {  # TST Table 3's one-stage and anchor-free pairs
    "retinanet_x101_r50": ("retinanet_resnext101_64x4d_fpn", "retinanet_resnet50_fpn"),
    "fcos_r101_r50": ("fcos_resnet101_fpn", "fcos_resnet50_fpn"),
}
# ReviewKD on detection as its authors' detectron2 code: all FPN levels, no warm-up, REVIEWKD_LOSS_WEIGHT
REVIEW = {"embedding": False, "warmup_epochs": 0}
REVIEW_WEIGHTS = {"r101_r18": 1.2, "r101_r50": 1.0, "r50_mv2": 2.0}
# (name, weight, constructor arguments) of each row's terms
TERMS_OF = {
    "teacher": [("det", 1.0, {})],
    "student": [("det", 1.0, {})],
    "fitnet": [("det", 1.0, {}), ("mimic", 1.0, {})],
    "fitnet_sokd": [("det", 1.0, {}), ("mimic", 1.0, {}), ("dam", 1.0, {})],
    "reviewkd": [("det", 1.0, {}), ("reviewkd", "pair", REVIEW)],
    "reviewkd_sokd": [("det", 1.0, {}), ("reviewkd", "pair", REVIEW), ("dam", 1.0, {})],
    "kd": [("det", 1.0, {}), ("dense_kd", 1.0, {"temperature": 1.0})],
    "kd_mimic": [("det", 1.0, {}), ("dense_kd", 1.0, {"temperature": 1.0}), ("mimic", 1.0, {})],
    "ours_kd": [("det", 1.0, {}), ("dense_kd", 1.0, {"temperature": 1.0})],
    "ours_kd_mimic": [("det", 1.0, {}), ("dense_kd", 1.0, {"temperature": 1.0}), ("mimic", 1.0, {})],
}
# (steps or epochs, milestones, lr, warm-up) per paper and row kind
DETECTRON2_1X = ("steps", 90000, [60000, 80000], 0.02, 1000)  # ReviewKD's 180k at batch 8, at batch 16
DETECTRON2_3X = ("steps", 270000, [210000, 250000], 0.02, 1000)
MMDET_2X = ("epochs", 24, [16, 22], 0.01, 0.068)  # 500 iterations of 7330 per epoch at batch 16
MMDET_1X = ("epochs", 12, [8, 11], 0.01, 0.068)


def rel(path: Path) -> str:
    return path.relative_to(PRESETS).as_posix()


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An empty weights file (validation checks that it exists) and an empty COCO root."""
    base = tmp_path_factory.mktemp("coco")
    weights = base / WEIGHTS
    weights.write_bytes(b"")
    (base / "root").mkdir()
    return weights, base / "root"


def load(path: Path, fake: tuple[Path, Path]):
    weights, root = fake
    overrides = [f"data.root={root}"]
    if "teacher" in _read_yaml(path):
        overrides.append(f"teacher.weights={weights}")
    return load_config(path, overrides=overrides)


def test_every_file_starts_with_a_comment():
    assert len(ALL_YAML) == 32
    for path in ALL_YAML:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 40, rel(path)


def test_preset_set_is_complete():
    expected = {f"sokd/teacher/{t}.yaml" for t in ("fasterrcnn_resnet101_fpn", "fasterrcnn_resnet50_fpn")}
    expected |= {f"sokd/student/{s}.yaml" for _, s in SOKD_PAIRS.values()}
    expected |= {f"sokd/{m}/{p}.yaml" for m in SOKD_METHODS for p in SOKD_PAIRS}
    expected |= {f"tst/teacher/{t}.yaml" for t, _ in TST_PAIRS.values()}
    expected |= {f"tst/student/{s}.yaml" for _, s in TST_PAIRS.values()}
    tst_kinds = ("kd", "kd_mimic", "ours_kd", "ours_kd_mimic")
    expected |= {f"tst/{m}/{p}.yaml" for m in tst_kinds for p in TST_PAIRS}
    assert {rel(p) for p in RUNNABLE} == expected and len(expected) == 29


def _schedule(paper: str, kind: str, student: str) -> tuple:
    if paper == "sokd":
        return DETECTRON2_3X if kind == "teacher" else DETECTRON2_1X
    return MMDET_1X if student == "retinanet_resnext101_64x4d_fpn" else MMDET_2X


@pytest.mark.parametrize("path", RUNNABLE, ids=rel)
def test_preset_validates_with_the_paper_schedule(path: Path, fake):
    config = load(path, fake)
    paper, kind, stem = rel(path).removesuffix(".yaml").split("/")
    raw = _read_yaml(path)  # the file with its bases merged, before validation and overrides
    assert raw["data"]["root"] == "data/coco" and config.data.root == str(fake[1])

    assert config.task == "detection" and config.data.name == "coco"
    assert (config.data.train_split, config.data.eval_split) == ("train2017", "val2017")
    assert (config.data.batch_size, config.data.eval_batch_size) == (16, 8)
    augment = config.data.augment
    assert augment.crop == (800, 1344) and augment.flip
    multiscale = paper == "sokd" or "fcos" in config.student.name  # detectron2's and mmdet FCOS's 640..800
    assert augment.scale == ((0.8, 1.0) if multiscale else (1.0, 1.0))

    models = [config.student] + ([config.teacher] if config.teacher is not None else [])
    for model in models:  # zoo detectors only, all resized as the crop (check_input_sizes passes)
        assert model.name in DET_MODELS and model.num_classes is None  # 80 from the dataset
        rpn = {"rpn_post_nms_top_n_train": 1000} if model.name.startswith("fasterrcnn") else {}
        assert model.kwargs == {"min_size": 800, "max_size": 1344, **rpn}  # detectron2's 1000 proposals

    (stage,) = config.stages
    unit, length, milestones, lr, warmup = _schedule(paper, kind, config.student.name)
    assert getattr(stage, unit) == length and stage.terms is None
    opt, sched = stage.optimizer, stage.schedule
    assert (opt.name, opt.lr, opt.momentum, opt.nesterov, opt.weight_decay) == ("sgd", lr, 0.9, False, 1e-4)
    assert (sched.name, sched.milestones, sched.gamma, sched.warmup) == ("multistep", milestones, 0.1, warmup)

    expected = [(n, REVIEW_WEIGHTS.get(stem) if w == "pair" else w, a) for n, w, a in TERMS_OF[kind]]
    assert [(t.name, t.weight, t.params) for t in config.terms] == expected
    if kind.endswith("_sokd"):  # DAFA searches in the first pass over train2017, every step
        (refiner,) = config.refiners
        assert refiner.name == "dafa" and refiner.params == {} and refiner.optimizer.lr == 0.005
        assert (refiner.update.every, refiner.update.iterations, refiner.update.epochs) == (1, 1, [1])
    elif kind.startswith("ours_"):  # TST's own rows: its searched augmentation on the KD (+ mimic) terms
        (refiner,) = config.refiners
        assert refiner.name == "tst"
        assert refiner.params == {"num_ops": 4, "temperature": 0.05, "alpha": 1.0, "beta": 1.0}
        assert (refiner.update.every, refiner.optimizer.lr) == (4, 0.05)
    else:
        assert config.refiners == []

    assert config.runtime.out_dir == "runs/coco" and config.name == f"{paper}_{kind}_{stem}"
    if kind in ("teacher", "student"):
        assert config.teacher is None and config.student.name == stem
        return
    teacher, student = (SOKD_PAIRS if paper == "sokd" else TST_PAIRS)[stem]
    assert (config.teacher.name, config.student.name) == (teacher, student)
    # the teacher preset's run directory exports exactly the file this preset loads
    teacher_run = run_directory(load(PRESETS / paper / "teacher" / f"{teacher}.yaml", fake))
    assert Path(raw["teacher"]["weights"]) == teacher_run / WEIGHTS


def test_run_names_are_unique(fake):
    dirs = [run_directory(load(p, fake)) for p in RUNNABLE]
    assert len(set(dirs)) == len(dirs)


def _bound_terms(config, student, teacher, sample):
    terms = [TERMS.build(t.name, **t.params) for t in config.terms]
    for term in terms:
        term.resolve_taps(student, teacher)
    s_shapes = dry_run(student, sample, sorted({k for t in terms for k in t.student_taps()}), "student")
    t_shapes = dry_run(teacher, sample, sorted({k for t in terms for k in t.teacher_taps()}), "teacher")
    for term in terms:
        term.bind(s_shapes, t_shapes)
    return terms, t_shapes


def _models(config, **extra):
    torch.manual_seed(0)
    small = {"min_size": 64, "max_size": 96, **extra}  # the preset's models at a tiny size
    student = build_model(config.student.name, num_classes=3, **small)
    teacher = build_model(config.teacher.name, num_classes=3, **small)
    return student, teacher


@pytest.mark.parametrize("method", ["fitnet_sokd", "reviewkd_sokd"])
def test_sokd_rows_bind_dam_and_dafa_on_the_real_models(method: str, fake):
    """ResNet-50 -> MobileNetV2 Faster R-CNN: mimic / ReviewKD take the five FPN levels p2..p6, dam the
    middle one (p4, stride 16) of both, DAFA refines every teacher level they map the student onto; one
    forward on tapped features gives finite terms of the teacher levels' shapes."""
    from kdkit.taps import Taps
    from kdkit.terms import StepView

    config = load(PRESETS / "sokd" / method / "r50_mv2.yaml", fake)
    student, teacher = _models(config)
    x = torch.randn(2, 3, 64, 96)
    terms, t_shapes = _bound_terms(config, student, teacher, x)
    _, feature, dam = terms
    levels = [f"levels.p{i}" for i in range(2, 7)]
    assert feature.student_taps() == feature.teacher_taps() == levels
    if method == "fitnet_sokd":
        assert feature.strides == [4, 8, 16, 32, 64] and len(feature.connectors) == 5
    else:  # one ABF per level, 256 channels in the middle as the authors' detection code
        assert len(feature.abfs) == 5 and feature.warmup_factor(0.0) == 1.0
    assert (dam.student_tap, dam.teacher_tap) == ("levels.p4", "levels.p4")
    assert t_shapes["levels.p4"] == (2, 256, 4, 6)  # 64x96 at stride 16
    (entry,) = config.refiners
    refiner = REFINERS.build(entry.name, **entry.params)
    refiner.bind(t_shapes, sorted({k for t in terms for k in t.teacher_space_taps()}))
    assert refiner.taps == levels

    taps_s, taps_t = Taps(student.train(), levels), Taps(teacher.eval(), levels)
    view = StepView(student=taps_s(x), teacher={k: v.detach() for k, v in taps_t(x).items()})
    taps_s.remove(), taps_t.remove()
    for term in (feature, dam):
        value = term(view)
        assert value.dim() == 0 and torch.isfinite(value) and value > 0
    space = feature.teacher_space(view)
    assert {k: v.shape for k, v in space.items()} == {k: t_shapes[k] for k in levels}


def test_kd_mimic_binds_on_the_real_fcos_pair(fake):
    """FCOS R101 -> R50: dense_kd accepts the pair (dense, same points per image), mimic pairs P3-P7."""
    config = load(PRESETS / "tst" / "kd_mimic" / "fcos_r101_r50.yaml", fake)
    student, teacher = _models(config)
    terms, _ = _bound_terms(config, student, teacher, torch.randn(1, 3, 64, 96))
    _, dense_kd, mimic = terms
    assert mimic.strides == [8, 16, 32, 64, 128]
    assert mimic.student_taps() == mimic.teacher_taps() == [f"levels.p{i}" for i in range(3, 8)]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        s_out, t_out = student.eval()(x), teacher.eval()(x)
    dense_kd._check_pair(s_out["out"].shape, t_out["out"].shape)  # same anchors, same classes
    assert s_out["out"].shape == (1, 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2 + 1 * 1, 3)


def _tiny_coco(root: Path) -> None:
    """train2017 and val2017 of 4 images (48x72) with two boxes each in 3 categories."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
        images, annotations = [], []
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (48, 72, 3), dtype=np.uint8)).save(root / split / f"{i}.png")
            images.append({"id": i + 1, "file_name": f"{i}.png", "height": 48, "width": 72})
            for j, box in enumerate(([4, 6, 20, 16], [30, 10, 24, 30])):
                annotations.append({"id": 10 * i + j, "image_id": i + 1, "category_id": 1 + (i + j) % 3,
                                    "bbox": box, "iscrowd": 0, "area": box[2] * box[3]})  # fmt: skip
        cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
        (root / "annotations").mkdir(exist_ok=True)
        data = {"images": images, "annotations": annotations, "categories": cats}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


@pytest.mark.slow
def test_fitnet_sokd_preset_trains_on_a_tiny_coco(tmp_path, monkeypatch):
    """The ResNet-50 -> MobileNetV2 FitNet + SoKD preset, shrunk (64x96 crops, 2 steps), trains on a
    COCO layout: DAFA updates before each step of its search pass and the run evaluates COCO mAP."""
    import json

    from kdkit.api import train_from_config
    from kdkit.models import save_weights

    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache"))
    _tiny_coco(tmp_path / "coco")
    small = {"min_size": 64, "max_size": 96}
    torch.manual_seed(0)
    save_weights(build_model("fasterrcnn_resnet50_fpn", num_classes=3, **small), tmp_path / "t.safetensors")
    overrides = [
        f"data.root={tmp_path / 'coco'}",
        f"teacher.weights={tmp_path / 't.safetensors'}",
        "teacher.kwargs.min_size=64", "teacher.kwargs.max_size=96",
        "student.kwargs.min_size=64", "student.kwargs.max_size=96",
        "data.augment.crop=[64,96]", "data.batch_size=2", "data.eval_batch_size=4", "data.num_workers=0",
        "stages.0.steps=2", "stages.0.eval_every=2", "stages.0.schedule.milestones=[1]",
        "stages.0.schedule.warmup=0", "runtime.precision=fp32", "runtime.progress=false",
        "runtime.checkpoint_every_steps=0",
    ]  # fmt: skip
    config = load_config(PRESETS / "sokd" / "fitnet_sokd" / "r50_mv2.yaml", overrides)
    summary = train_from_config(config, run_dir=tmp_path / "run")
    assert summary["metric"] == "map"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["kind"] == "refiner"]) == 2


DEMO = PRESETS.parent / "demo_detection"


def test_demo_presets_validate_and_tst_adds_only_its_refiner_to_kd_mimic(fake):
    configs = {}
    for path in sorted(p for p in DEMO.glob("*.yaml") if p.name != "base.yaml"):
        assert path.read_text().startswith("# "), path.name
        overrides = [f"teacher.weights={fake[0]}"] if "teacher" in _read_yaml(path) else []
        configs[path.stem] = load_config(path, overrides=overrides)
        assert configs[path.stem].task == "detection"
    base, tst = configs["kd_mimic"], configs["kd_mimic_tst"]
    assert [(t.name, t.weight, t.params) for t in tst.terms] == [
        ("det", 1.0, {}), ("dense_kd", 1.0, {"temperature": 1.0}), ("mimic", 0.05, {}),
    ] == [(t.name, t.weight, t.params) for t in base.terms]  # fmt: skip
    assert base.refiners == [] and [r.name for r in tst.refiners] == ["tst"]
    assert (tst.refiners[0].update.every, tst.refiners[0].optimizer.lr) == (4, 0.05)
