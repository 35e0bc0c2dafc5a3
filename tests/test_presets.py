"""CIFAR-100 presets (configs/cifar100): every runnable preset validates, follows the literature's
schedule and its method's term weights, covers every pair listed in docs/presets.md, and the feature
terms find their taps on the real zoo models."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

import kdkit.data  # noqa: F401  (registers the datasets)
import kdkit.terms  # noqa: F401  (registers the terms)
from kdkit.config import _read_yaml, load_config
from kdkit.deploy.export import WEIGHTS
from kdkit.engine.build import run_directory
from kdkit.models import build_model
from kdkit.registry import DATASETS, TERMS
from kdkit.taps import dry_run

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "src" / "kdkit" / "configs" / "cifar100"
DOCS = REPO / "docs" / "presets.md"

SOKD = ("fitnet_sokd", "at_sokd", "crd_sokd", "reviewkd_sokd")
METHODS = ("kd", "dkd", "fitnet", "at", "tst", "crd", "reviewkd", *SOKD)
# ReviewKD's weight per pair: the authors' CIFAR-100 script where it lists the pair, else 1 (its default)
REVIEWKD_WEIGHTS = {
    "resnet56_resnet20": 0.6,
    "resnet32x4_resnet8x4": 5.0,
    "wrn_40_2_wrn_16_2": 5.0,
    "wrn_40_2_wrn_40_1": 5.0,
    "resnet32x4_shufflenetv2": 8.0,
}
SMALL_STUDENTS = {"mobilenetv2", "shufflenetv1", "shufflenetv2"}  # trained with lr 0.01 in CRD/DKD
# (name, weight, constructor arguments) of each method's terms: the CRD / DKD code-base settings.
METHOD_TERMS = {
    "kd": [("ce", 0.1, {}), ("kd", 0.9, {"temperature": 4})],
    "dkd": [
        ("ce", 1.0, {}),
        ("dkd", 1.0, {"alpha": 1.0, "beta": 8.0, "temperature": 4, "warmup_epochs": 20}),
    ],
    "fitnet": [("ce", 1.0, {}), ("fitnet", 100.0, {})],
    "at": [("ce", 1.0, {}), ("at", 1000.0, {"p": 2})],
    "tst": [("ce", 1.0, {}), ("kd", 1.0, {"temperature": 4})],
    "crd": [("ce", 1.0, {}), ("crd", 0.8, {})],
    "reviewkd": [("ce", 1.0, {}), ("reviewkd", "pair", {})],
    "fitnet_sokd": [("ce", 1.0, {}), ("dam", 1.0, {"area_weight": 100})],
    "at_sokd": [("ce", 1.0, {}), ("at", 1000.0, {"p": 2}), ("dam", 1.0, {})],
    "crd_sokd": [("ce", 1.0, {}), ("crd", 0.8, {}), ("dam", 1.0, {})],
    "reviewkd_sokd": [("ce", 1.0, {}), ("reviewkd", "pair", {}), ("dam", 1.0, {})],
    "teachers": [("ce", 1.0, {})],
    "baseline": [("ce", 1.0, {})],
}


def is_parent(path: Path) -> bool:
    """Files other presets start from (``base: ...``), not runs of their own."""
    return path.stem.startswith(("base", "method"))


ALL_YAML = sorted(PRESETS.rglob("*.yaml"))
RUNNABLE = [p for p in ALL_YAML if not is_parent(p)]


def rel(path: Path) -> str:
    return path.relative_to(PRESETS).as_posix()


def doc_pairs() -> list[tuple[str, str]]:
    """(teacher, student) rows of the preset table in docs/presets.md: lines ``| `t` | `s` | ...``."""
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \|", DOCS.read_text(), flags=re.M)
    assert rows, "docs/presets.md lists no pairs"
    return rows


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / WEIGHTS
    path.write_bytes(b"")  # validation only checks that the file exists
    return path


def load(path: Path, fake_weights: Path):
    overrides = [f"teacher.weights={fake_weights}"] if "teacher" in _read_yaml(path) else []
    return load_config(path, overrides=overrides)


def test_cifar100_dataset_is_registered():
    assert "cifar100" in DATASETS


def test_every_file_starts_with_a_comment():
    assert ALL_YAML
    for path in ALL_YAML:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 10, rel(path)


def test_preset_set_is_complete():
    pairs = doc_pairs()
    teachers = {t for t, _ in pairs}
    students = {s for _, s in pairs}
    expected = {f"teachers/{t}.yaml" for t in teachers} | {f"baseline/{s}.yaml" for s in students}
    expected |= {f"{m}/{t}_{s}.yaml" for m in METHODS for t, s in pairs}
    assert {rel(p) for p in RUNNABLE} == expected  # every documented pair has all four methods, nothing extra
    assert len(set(pairs)) == len(pairs)


@pytest.mark.parametrize("path", RUNNABLE, ids=rel)
def test_preset_validates_with_literature_schedule(path: Path, fake_weights: Path):
    config = load(path, fake_weights)
    kind = rel(path).split("/")[0]

    raw = _read_yaml(path)  # what the file itself says, before validation
    assert raw["data"]["name"] == "cifar100" and raw["data"]["root"] == "data/cifar"
    data = config.data
    assert (data.batch_size, data.eval_batch_size) == (64, 256)
    assert (data.augment.crop_padding, data.augment.flip) == (4, True)
    assert config.student.num_classes is None  # taken from the dataset: 100

    (stage,) = config.stages
    assert stage.epochs == 240 and stage.steps is None and stage.terms is None
    opt, sched = stage.optimizer, stage.schedule
    lr = 0.01 if config.student.name in SMALL_STUDENTS else 0.05
    assert (opt.name, opt.lr, opt.momentum, opt.nesterov, opt.weight_decay) == ("sgd", lr, 0.9, False, 5e-4)
    assert (sched.name, sched.milestones, sched.gamma) == ("multistep", [150, 180, 210], 0.1)
    assert sched.warmup == 0.0

    terms = [(t.name, t.weight, t.params) for t in config.terms]
    review = REVIEWKD_WEIGHTS.get(path.stem, 1.0)
    assert terms == [(n, review if w == "pair" else w, a) for n, w, a in METHOD_TERMS[kind]]
    if kind.endswith("_sokd"):  # DAFA searches in 20 of 240 epochs (SoKD Table 6), every step
        (refiner,) = config.refiners
        assert refiner.name == "dafa" and refiner.params == {}
        update = refiner.update
        assert (update.every, update.iterations, update.epochs) == (1, 1, list(range(1, 21)))
    elif kind == "tst":  # Eq. 2 and 4 settings, one search update every 8 student steps (Table 6)
        (refiner,) = config.refiners
        assert refiner.name == "tst" and refiner.params == {
            "num_ops": 4,
            "temperature": 0.05,
            "alpha": 1.0,
            "beta": 1.0,
        }
        assert (refiner.update.every, refiner.update.iterations, refiner.update.epochs) == (8, 1, None)
    else:
        assert config.refiners == []

    if kind == "teachers":
        assert config.teacher is None and config.name == path.stem == config.student.name
        assert run_directory(config) == Path("runs/cifar100/teachers") / path.stem
    elif kind == "baseline":
        assert config.teacher is None and config.student.name == path.stem
        assert config.name == f"baseline_{path.stem}" and config.runtime.out_dir == "runs/cifar100"
    else:
        teacher, student = raw["teacher"]["name"], raw["student"]["name"]
        assert path.stem == f"{teacher}_{student}" and config.name == f"{kind}_{teacher}_{student}"
        assert config.teacher is not None and config.teacher.name == teacher
        # the teacher preset's run directory exports exactly the file this preset loads
        teacher_run = run_directory(load(PRESETS / "teachers" / f"{teacher}.yaml", fake_weights))
        assert Path(raw["teacher"]["weights"]) == teacher_run / WEIGHTS
        assert config.runtime.out_dir == "runs/cifar100"


def test_run_names_are_unique(fake_weights: Path):
    dirs = [run_directory(load(p, fake_weights)) for p in RUNNABLE]
    assert len(set(dirs)) == len(dirs)


def test_lr001_parents_differ_only_in_lr():
    base, small = _read_yaml(PRESETS / "base.yaml"), _read_yaml(PRESETS / "base_lr001.yaml")
    assert small["stages"][0]["optimizer"].pop("lr") == 0.01
    assert base["stages"][0]["optimizer"].pop("lr") == 0.05
    assert small == base
    for method in (*METHODS, "baseline"):
        plain = _read_yaml(PRESETS / method / "method.yaml")
        lr001 = _read_yaml(PRESETS / method / "method_lr001.yaml")
        assert lr001["terms"] == plain["terms"] and lr001.get("refiners") == plain.get("refiners"), method


def test_feature_terms_find_their_taps(fake_weights: Path):
    """FitNet and AT of resnet32x4 -> resnet8x4 resolve their default taps; one dry run finds them all."""
    torch.manual_seed(0)
    student, teacher = build_model("resnet8x4", num_classes=100), build_model("resnet32x4", num_classes=100)
    terms = {}
    for method in ("fitnet", "at"):
        config = load(PRESETS / method / "resnet32x4_resnet8x4.yaml", fake_weights)
        (entry,) = [t for t in config.terms if t.name == method]
        terms[method] = TERMS.build(entry.name, **entry.params)
        terms[method].resolve_taps(student, teacher)
    sample = torch.randn(2, 3, 32, 32)
    s_shapes = dry_run(student, sample, [k for t in terms.values() for k in t.student_taps()], "student")
    t_shapes = dry_run(teacher, sample, [k for t in terms.values() for k in t.teacher_taps()], "teacher")
    for term in terms.values():
        assert set(term.student_taps()) <= set(s_shapes) and set(term.teacher_taps()) <= set(t_shapes)
        term.bind(s_shapes, t_shapes)
    fitnet, at = terms["fitnet"], terms["at"]
    # CRD's hint_layer=2: the middle stage; the connector maps the student's onto the teacher's shape
    assert (fitnet.student_tap, fitnet.teacher_tap) == ("layer2", "layer2")
    assert fitnet.connector(torch.zeros(s_shapes["layer2"])).shape == t_shapes["layer2"]
    # AT: the three stage outputs, as CRD's g[1:-1]
    assert at.student_taps() == at.teacher_taps() == ["layer1", "layer2", "layer3"]


def test_docs_name_only_zoo_models():
    from kdkit.registry import MODELS

    for teacher, student in doc_pairs():
        assert teacher in MODELS and student in MODELS
    text = DOCS.read_text()
    assert "data/cifar/cifar-100-python" in text and "--set data.root=" in text
    assert yaml.safe_load((PRESETS / "base.yaml").read_text())["data"]["root"] == "data/cifar"


def test_imagenet_tst_preset_follows_dist_schedule(fake_weights: Path):
    """TST Table 2 (ResNet-34 -> ResNet-18) on DIST's ImageNet schedule."""
    path = REPO / "src" / "kdkit" / "configs" / "imagenet" / "tst_resnet34_resnet18.yaml"
    config = load_config(path, [f"teacher.weights={fake_weights}"])
    assert (config.teacher.name, config.student.name) == ("torchvision:resnet34", "torchvision:resnet18")
    (stage,) = config.stages
    assert (stage.epochs, stage.optimizer.lr, stage.optimizer.weight_decay) == (100, 0.1, 1e-4)
    assert stage.schedule.milestones == [30, 60, 90] and config.data.batch_size == 256
    assert [r.name for r in config.refiners] == ["tst"]


def test_sokd_preset_binds_dam_and_dafa_on_zoo_models(fake_weights: Path):
    """ReviewKD + SoKD, resnet32x4 -> resnet8x4: `dam` on the middle stage; `dafa` refines every teacher
    level that ReviewKD or DAM maps the student onto (the three stage outputs, not the embedding)."""
    from kdkit.registry import REFINERS

    torch.manual_seed(0)
    student, teacher = build_model("resnet8x4", num_classes=100), build_model("resnet32x4", num_classes=100)
    config = load(PRESETS / "reviewkd_sokd" / "resnet32x4_resnet8x4.yaml", fake_weights)
    terms = [TERMS.build(t.name, **t.params) for t in config.terms]
    for term in terms:
        term.resolve_taps(student, teacher)
    sample = torch.randn(2, 3, 32, 32)
    s_shapes = dry_run(student, sample, sorted({k for t in terms for k in t.student_taps()}), "student")
    t_shapes = dry_run(teacher, sample, sorted({k for t in terms for k in t.teacher_taps()}), "teacher")
    for term in terms:
        term.bind(s_shapes, t_shapes)
    dam = terms[2]
    assert (dam.student_tap, dam.teacher_tap) == ("layer2", "layer2")
    (entry,) = config.refiners
    refiner = REFINERS.build(entry.name, **entry.params)
    refiner.bind(t_shapes, sorted({k for t in terms for k in t.teacher_space_taps()}))
    assert refiner.taps == ["layer1", "layer2", "layer3"]


IMAGENET_SOKD = sorted((REPO / "src" / "kdkit" / "configs" / "imagenet" / "sokd").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in IMAGENET_SOKD if p.stem != "base"], ids=lambda p: p.stem)
def test_imagenet_sokd_presets_follow_the_paper_schedule(path: Path, fake_weights: Path):
    """SoKD Table 3 (ResNet-34 -> ResNet-18): batch 512, lr 0.1, 100 epochs, lr / 10 at 30, 60, 90."""
    config = load_config(path, [f"teacher.weights={fake_weights}"])
    assert (config.teacher.name, config.student.name) == ("torchvision:resnet34", "torchvision:resnet18")
    (stage,) = config.stages
    assert (stage.epochs, stage.optimizer.lr, config.data.batch_size) == (100, 0.1, 512)
    assert stage.schedule.milestones == [30, 60, 90]
    names = [t.name for t in config.terms]
    assert names[0] == "ce" and names[1] == path.stem.removesuffix("_sokd")
    sokd = path.stem.endswith("_sokd")
    assert ("dam" in names) == sokd and [r.name for r in config.refiners] == (["dafa"] if sokd else [])
    assert config.name == f"{path.stem}_resnet34_resnet18"


@pytest.mark.parametrize("stem", ["kd_resnet34_resnet18", "kd_resnet50_mobilenet", "tst_resnet34_resnet18"])
def test_imagenet_presets_use_the_imagenet_pipeline(stem: str, fake_weights: Path):
    """Random-resized crop 224 + flip per image at decode time; resize 256 + centre crop 224 to evaluate;
    the literature's schedule (lr 0.1, batch 256, 100 epochs, lr / 10 at 30, 60, 90, weight decay 1e-4)."""
    config = load_config(
        REPO / "src" / "kdkit" / "configs" / "imagenet" / f"{stem}.yaml", [f"teacher.weights={fake_weights}"]
    )
    augment = config.data.augment
    assert augment.resized_crop.size == 224 and augment.resized_crop.scale == (0.08, 1.0) and augment.flip
    assert (
        config.data.eval_params == {"image_size": 224, "resize_size": 256}
        and "image_size" not in config.data.params
    )
    (stage,) = config.stages
    assert (stage.epochs, stage.optimizer.lr, stage.optimizer.weight_decay, config.data.batch_size) == (
        100,
        0.1,
        1e-4,
        256,
    )
    assert stage.schedule.milestones == [30, 60, 90]
    if stem.startswith("kd_"):
        assert [(t.name, t.weight) for t in config.terms] == [("ce", 0.5), ("kd", 0.5)]
