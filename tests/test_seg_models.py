"""Segmentation models: every new model segments at the input size, trains, declares working taps at
output stride 8; parameter counts match I2CKD; torchvision's models build offline and take COCO-style
state dicts; Spirit Distillation's grouped copy keeps every shape and its student builds."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdkit.errors import KdkitError
from kdkit.models import build_model, load_weights, seg_compact, seg_resnet
from kdkit.models.spirit import SegNetDecoder, grouped_copy, split_model
from kdkit.registry import MODELS
from kdkit.taps import Taps, dry_run, main_output, split_key

SEG_MODELS = (*seg_resnet.SEG_MODELS, *seg_compact.SEG_MODELS)
BIG = tuple(n for n in SEG_MODELS if n.endswith("resnet101"))  # built on the meta device only
TORCHVISION_SEG = (
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "fcn_resnet50",
    "fcn_resnet101",
    "lraspp_mobilenet_v3_large",
)
# I2CKD Table 2 (19 classes), millions; the CIRKD-style models it counts carry the auxiliary FCN head.
I2CKD_PARAMS = {"deeplabv3_resnet101": 61.1, "deeplabv3_resnet18": 13.6, "pspnet_resnet18": 12.9}
H, W = 32, 48


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def tv_deeplab() -> nn.Module:
    torch.manual_seed(0)
    return build_model("torchvision:deeplabv3_resnet50", num_classes=21, aux_loss=True).eval()


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops()


def _check_taps(model: nn.Module, x: torch.Tensor, stride: int = 8) -> dict[str, torch.Size]:
    """Taps resolve; features run shallow to deep down to 1/stride; the classifier reads the embedding."""
    keys = [*model.feature_taps, model.embedding_tap]
    shapes = dry_run(model, x, keys)
    sizes = [shapes[k][-2:] for k in model.feature_taps]
    assert all(len(shapes[k]) == 4 for k in keys)
    assert [s[0] for s in sizes] == sorted((s[0] for s in sizes), reverse=True)
    assert sizes[-1] == (x.shape[2] // stride, x.shape[3] // stride)
    path, is_input = split_key(model.embedding_tap)
    assert is_input and isinstance(model.get_submodule(path), nn.Conv2d)
    assert model.get_submodule(path).kernel_size == (1, 1)
    return shapes


def _assert_trains(model: nn.Module, out: Any) -> None:
    loss = sum(o.float().square().mean() for o in (out.values() if isinstance(out, dict) else [out]))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"


@pytest.mark.parametrize("name", [n for n in SEG_MODELS if n not in BIG])
def test_seg_model_segments_trains_and_declares_taps(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=5).train()
    x = torch.randn(2, 3, H, W)
    out = model(x)
    assert out.shape == (2, 5, H, W) and torch.isfinite(out).all()
    _assert_trains(model, out)

    shapes = _check_taps(model, x)
    model.eval()
    taps = Taps(model, [model.embedding_tap])
    with torch.no_grad():
        found = taps(x)
    taps.remove()
    logits = model.get_submodule(split_key(model.embedding_tap)[0])(found[model.embedding_tap])
    upsampled = F.interpolate(logits, (H, W), mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsampled, found["logits"])
    assert shapes[model.embedding_tap][-2:] == (H // 8, W // 8)

    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x.to(memory_format=torch.channels_last))
    assert low.shape == (2, 5, H, W) and low.dtype == torch.bfloat16 and torch.isfinite(low).all()


@pytest.mark.parametrize("name", BIG)
def test_resnet101_models_on_the_meta_device(name: str) -> None:
    with torch.device("meta"):
        model = build_model(name, num_classes=19)
    x = torch.empty(1, 3, 64, 128, device="meta")
    assert model.eval()(x).shape == (1, 19, 64, 128)
    _check_taps(model, x)


def test_output_stride_16_and_aux_head() -> None:
    torch.manual_seed(0)
    model = build_model("deeplabv3_resnet18", num_classes=5, output_stride=16, aux_loss=True).train()
    aspp = model.head[0]
    assert [b[0].dilation for b in aspp.branches[1:]] == [(6, 6), (12, 12), (18, 18)]
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert set(out) == {"out", "aux"} and all(o.shape == (2, 5, 64, 64) for o in out.values())
    _assert_trains(model, out)
    _check_taps(model, x, stride=16)
    assert build_model("deeplabv3_resnet18", 5).head[0].branches[1][0].dilation == (12, 12)
    with pytest.raises(KdkitError, match="output_stride"):
        build_model("pspnet_resnet18", 5, output_stride=32)


@pytest.mark.parametrize(("name", "millions"), sorted(I2CKD_PARAMS.items()))
def test_param_counts_match_i2ckd(name: str, millions: float) -> None:
    with torch.device("meta"):
        model = build_model(name, num_classes=19, aux_loss=True)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - millions) <= 0.03 * millions, f"{name}: {count:.2f}M vs {millions}M"


def test_backbone_weights_load_torchvision_imagenet_files(tmp_path) -> None:
    import torchvision

    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()  # keeps fc.*, as ImageNet files do
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # as old files
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = build_model("pspnet_resnet18", num_classes=5, backbone_weights=str(path))
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert model.backbone.layer4[1].conv2.dilation == (4, 4)  # still dilated after loading

    safe = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, safe)
    model = build_model("deeplabv3_resnet18", num_classes=5, backbone_weights=safe)
    torch.testing.assert_close(model.backbone.conv1.weight, state["conv1.weight"])

    torch.save({k.replace("layer4", "stage4"): v for k, v in state.items()}, path)
    with pytest.raises(KdkitError, match="not a torchvision ResNet-18"):
        build_model("deeplabv3_resnet18", num_classes=5, backbone_weights=path)


# --- torchvision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TORCHVISION_SEG)
def test_torchvision_seg_models_build_offline(name: str) -> None:
    with torch.device("meta"):
        model = build_model(f"torchvision:{name}", num_classes=5, aux_loss=not name.startswith("lraspp"))
    stride = 16 if "mobilenet" in name else 8
    x = torch.empty(2, 3, 64, 96, device="meta")
    assert main_output(model.eval()(x)).shape == (2, 5, 64, 96)
    shapes = _check_taps(model, x, stride)
    assert shapes[model.embedding_tap][0] == 2


@pytest.mark.parametrize("name", ["deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"])
def test_torchvision_mobilenet_seg_models_train(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(f"torchvision:{name}", num_classes=5).train()
    out = model(torch.randn(2, 3, H, W))
    assert out["out"].shape == (2, 5, H, W)
    _assert_trains(model, out)
    assert model.feature_taps == ("backbone.3", "backbone.6", "backbone.12", "backbone.16")


def test_torchvision_seg_refuses_downloads() -> None:
    with pytest.raises(KdkitError, match="never downloads"):
        build_model("torchvision:fcn_resnet50", num_classes=5, weights_backbone="DEFAULT")


def test_coco_style_checkpoint_loads(tmp_path, tv_deeplab: nn.Module) -> None:
    """torchvision's deeplabv3_resnet50_coco checkpoint: 21 classes, backbone/classifier/aux_classifier."""
    state = tv_deeplab.state_dict()
    assert any(k.startswith("aux_classifier.") for k in state)
    assert tv_deeplab.feature_taps[-1] == "backbone.layer4"
    assert tv_deeplab.embedding_tap == "classifier.4:input"
    path = tmp_path / "deeplabv3_resnet50_coco.pth"
    torch.save(state, path)
    model = build_model("torchvision:deeplabv3_resnet50", num_classes=21, aux_loss=True)
    load_weights(model, path)
    for key in ("backbone.conv1.weight", "classifier.4.weight", "aux_classifier.4.bias"):
        torch.testing.assert_close(model.state_dict()[key], state[key])
    with pytest.raises(KdkitError, match="unexpected keys aux_classifier"):
        load_weights(build_model("torchvision:deeplabv3_resnet50", num_classes=21), path)


# --- Spirit Distillation -------------------------------------------------------------------------


def _shapes(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Output shape of every module (nested for dict and tuple outputs), by path, in eval mode."""

    def shape(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items()}
        return tuple(shape(v) for v in value)

    found: dict[str, Any] = {}

    def record(path: str):
        def hook(_module: nn.Module, _inputs: Any, out: Any) -> None:
            found.setdefault(path, shape(out))

        return hook

    handles = [m.register_forward_hook(record(path)) for path, m in model.named_modules()]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return found


@pytest.mark.parametrize("which", ["mini_deeplab_teacher", "torchvision"])
def test_grouped_copy_keeps_every_shape_and_cuts_flops(which: str, tv_deeplab: nn.Module) -> None:
    torch.manual_seed(0)
    model = tv_deeplab if which == "torchvision" else build_model(which, num_classes=5)
    copy = grouped_copy(model)
    x = torch.randn(2, 3, H, W)
    original = _shapes(model, x)
    called = {p for p, m in model.named_modules() if not isinstance(m, nn.ModuleList)}
    assert set(original) == called and len(called) > 50
    assert _shapes(copy, x) == original

    convs = [(p, m) for p, m in copy.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.groups == math.gcd(m.in_channels, m.out_channels) for _, m in convs)
    assert any(m.groups > 1 for _, m in convs)
    for path, conv in convs:  # fresh convs, same geometry
        old = model.get_submodule(path)
        assert conv is not old and (conv.kernel_size, conv.stride, conv.padding, conv.dilation) == (
            old.kernel_size,
            old.stride,
            old.padding,
            old.dilation,
        )
        assert (conv.bias is None) == (old.bias is None)
    kinds = {p: type(m) for p, m in copy.named_modules()}
    assert kinds == {p: type(m) for p, m in model.named_modules()}
    bn = next(p for p, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(copy.get_submodule(bn).running_var, model.get_submodule(bn).running_var)
    assert _flops(copy, x) < _flops(model, x) / 3


def test_segnet_decoder_follows_table_v() -> None:
    decoder = SegNetDecoder(2048, 2)
    assert [name for name, _ in decoder.named_children()] == ["stage1", "stage2", "classifier"]
    for stage, depth in ((decoder.stage1, 3), (decoder.stage2, 4)):
        assert isinstance(stage[0], nn.Upsample) and stage[0].scale_factor == 2
        convs = [m for m in stage if isinstance(m, nn.Conv2d)]
        assert len(convs) == depth and all(c.out_channels == 512 and c.kernel_size == (3, 3) for c in convs)
        assert all(c.groups == math.gcd(c.in_channels, 512) for c in convs)
    assert decoder.stage1[1].groups == 512 and decoder.classifier.groups == 1
    out = decoder.eval()(torch.randn(1, 2048, 4, 6))
    assert out.shape == (1, 2, 16, 24)
    with pytest.raises(KdkitError, match="differ in length"):
        SegNetDecoder(64, 2, widths=(32,), depths=(1, 1))


def test_spirit_student_from_torchvision_deeplabv3(tv_deeplab: nn.Module) -> None:
    torch.manual_seed(0)
    student = build_model(  # the literal rule; the default is tested in test_seeds_exact.py
        "spirit", num_classes=2, teacher="torchvision:deeplabv3_resnet50", grouping="gcd"
    ).train()
    assert [name for name, _ in student.named_children()] == ["extractor", "head"]
    x = torch.randn(2, 3, H, W)
    out = student(x)
    assert out.shape == (2, 2, H, W)
    _assert_trains(student, out)
    teacher_amg = dry_run(tv_deeplab, x, ["backbone"])["backbone"]
    shapes = dry_run(student, x, [*student.feature_taps, student.embedding_tap])
    assert shapes["extractor"] == teacher_amg == (2, 2048, H // 8, W // 8)
    assert shapes["head.classifier:input"] == (2, 512, H // 2, W // 2)
    convs = [m for m in student.extractor.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.groups == math.gcd(c.in_channels, c.out_channels) for c in convs)
    teacher_params = sum(p.numel() for p in tv_deeplab.backbone.parameters())
    assert sum(p.numel() for p in student.extractor.parameters()) < teacher_params / 20


def test_spirit_student_from_the_compact_teacher() -> None:
    torch.manual_seed(0)
    teacher = build_model("mini_deeplab_teacher", num_classes=10)
    x = torch.randn(2, 3, 64, 128)
    for split in ("backbone", "backbone.layer2"):
        student = build_model(
            "spirit", 10, teacher="mini_deeplab_teacher", split=split, widths=(32, 16), depths=(1, 2)
        )
        out = student.train()(x)
        assert out.shape == (2, 10, 64, 128)
        _assert_trains(student, out)
        assert dry_run(student, x, ["extractor"])["extractor"] == dry_run(teacher, x, [split])[split]
        assert _flops(student, x) < _flops(teacher, x) / 8
    student = student.to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = student(x.to(memory_format=torch.channels_last))
    assert low.shape == (2, 10, 64, 128) and low.dtype == torch.bfloat16

    wide = build_model("spirit", 10, teacher="mini_deeplab", teacher_kwargs={"width": 0.5}, widths=(16, 16))
    assert dry_run(wide, x, ["extractor"])["extractor"][1] == 80
    assert "spirit" in MODELS.names()


def test_split_model_names_the_teacher_head_and_valid_splits() -> None:
    teacher = build_model("mini_deeplab_teacher", num_classes=10)
    front, rest = split_model(teacher, "backbone.layer2")
    assert [name for name, _ in front.named_children()] == ["stem", "layer1", "layer2"]
    assert rest == ["backbone.layer3", "head", "classifier"]
    assert front.layer1 is teacher.backbone.layer1  # a view of the teacher, not a copy
    with pytest.raises(KdkitError, match=r"one of \['backbone', 'backbone.stem'"):
        build_model("spirit", 10, teacher="mini_deeplab_teacher", split="head")
