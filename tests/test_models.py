"""Model zoo: every registered model trains and declares working taps; counts match the literature;
hub builders; weight files load and save with clear errors."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from kdkit.errors import KdkitError
from kdkit.models import build_model, detection, load_weights, save_weights, seg_compact, seg_resnet
from kdkit.registry import MODELS
from kdkit.taps import Taps, dry_run, split_key

# Millions of parameters at 100 classes, as printed in the CRD / DKD tables (two decimals).
LITERATURE_PARAMS = {
    "resnet8": 0.08,
    "resnet14": 0.18,
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet44": 0.67,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "wrn_40_2": 2.26,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "mobilenetv2": 0.81,
    "shufflenetv1": 0.95,
    "shufflenetv2": 1.36,
}


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):
        return False
    return True


needs_torchvision = pytest.mark.skipif(
    not _torchvision_imports(), reason="torchvision cannot be imported here (built for another torch?)"
)
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm not installed")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _check_taps(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The declared taps: dry-run shapes equal a real Taps forward; returns the tapped tensors."""
    keys = [*model.feature_taps, model.embedding_tap]
    shapes = dry_run(model, x, keys)
    model.eval()
    taps = Taps(model, keys)
    try:
        with torch.no_grad():
            found = taps(x)
    finally:
        taps.remove()
    assert {k: tuple(shapes[k]) for k in keys} == {k: tuple(found[k].shape) for k in keys}
    features = [found[k] for k in model.feature_taps]
    assert len(features) >= 2
    assert all(f.dim() == 4 and f.shape[0] == x.shape[0] for f in features)
    sizes = [f.shape[-1] for f in features]
    assert sizes == sorted(sizes, reverse=True), sizes
    embedding = found[model.embedding_tap]
    assert embedding.dim() == 2 and embedding.shape[0] == x.shape[0]
    classifier, is_input = split_key(model.embedding_tap)
    assert is_input
    torch.testing.assert_close(model.get_submodule(classifier)(embedding), found["logits"])
    return found


SEGMENTERS = {*seg_resnet.SEG_MODELS, *seg_compact.SEG_MODELS, "spirit"}  # swept in test_seg_models
DETECTORS = set(detection.DET_MODELS)  # swept in test_det_models
CLASSIFIERS = [n for n in MODELS.names() if n not in SEGMENTERS | DETECTORS]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_zoo_model_trains_and_declares_taps(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([1, 7])).backward()
    for pname, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{pname} got no gradient"
            assert torch.isfinite(param.grad).all(), f"{pname} has a non-finite gradient"

    found = _check_taps(model, x)
    # zoo convention: the last feature tap is the map that global average pooling turns into the embedding
    torch.testing.assert_close(found[model.feature_taps[-1]].mean((2, 3)), found[model.embedding_tap])


def test_every_literature_model_is_registered() -> None:
    assert set(LITERATURE_PARAMS) <= set(MODELS.names())


@pytest.mark.parametrize(("name", "millions"), sorted(LITERATURE_PARAMS.items()))
def test_param_count_matches_literature(name: str, millions: float) -> None:
    count = sum(p.numel() for p in build_model(name, num_classes=100).parameters()) / 1e6
    # 3% relative, or the papers' rounding to two decimals (resnet8: 0.0839M prints as 0.08M)
    assert abs(count - millions) <= max(0.03 * millions, 0.005), f"{name}: {count:.4f}M vs {millions}M"


def test_feature_taps_follow_the_stages() -> None:
    assert build_model("resnet8", 10).feature_taps == ("layer1", "layer2", "layer3")
    assert build_model("wrn_16_2", 10).feature_taps == ("layer1", "layer2", "head")
    assert build_model("vgg8", 10).feature_taps == ("layer2", "layer3", "layer4", "layer5")
    assert build_model("mobilenetv2", 10).feature_taps == ("layer2", "layer3", "layer5", "head")
    assert all(build_model(n, 10).embedding_tap == "fc:input" for n in ("resnet8", "shufflenetv1"))


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("torchvision:resnet18", marks=needs_torchvision),
        pytest.param("timm:resnet18", marks=needs_timm),
    ],
)
def test_hub_resnet18_builds_with_taps(name: str) -> None:
    model = build_model(name, num_classes=10)
    assert model.feature_taps == ("layer1", "layer2", "layer3", "layer4")
    assert model.embedding_tap == "fc:input"
    x = torch.randn(2, 3, 32, 32)
    assert model.eval()(x).shape == (2, 10)
    _check_taps(model, torch.randn(2, 3, 64, 64))  # 64x64 keeps layer4 larger than 1x1


@needs_torchvision
def test_torchvision_taps_are_inferred_from_the_trunk() -> None:
    model = build_model("torchvision:mobilenet_v2", num_classes=10)
    assert model.feature_taps == ("features.3", "features.6", "features.13", "features.18")
    assert model.embedding_tap == "classifier.1:input"
    _check_taps(model, torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("resnet9", "did you mean 'resnet8'"),
        ("resnet18", "torchvision:<name>"),
        ("tv:resnet18", "'torchvision:<name>' or 'timm:<name>'"),
        pytest.param("torchvision:resnet181", "did you mean 'resnet18'", marks=needs_torchvision),
        pytest.param("timm:resnet181", "did you mean 'resnet18'", marks=needs_timm),
    ],
)
def test_unknown_model_names_the_nearest(name: str, message: str) -> None:
    with pytest.raises(KdkitError, match="unknown") as err:
        build_model(name, num_classes=10)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("torchvision:resnet18", {"weights": "DEFAULT"}, "never downloads"),
        ("timm:resnet18", {"pretrained": True}, "never downloads"),
        ("resnet8", {"depth": 3}, "depth"),
    ],
)
def test_bad_options_are_user_errors(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(KdkitError, match=message):
        build_model(name, num_classes=10, **kwargs)


def test_missing_timm_or_broken_torchvision_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(KdkitError, match=r"timm is not installed: pip install 'kdkit\[timm\]'"):
        build_model("timm:resnet18", num_classes=10)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(KdkitError, match="torchvision cannot be imported"):
        build_model("torchvision:resnet18", num_classes=10)


# --- weights -------------------------------------------------------------------------------------


def _trained(name: str = "resnet8", num_classes: int = 10, seed: int = 0) -> nn.Module:
    """A model whose parameters and BN statistics differ from a fresh build."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=num_classes)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 32, 32))
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    return model.eval()


def _same_outputs(a: nn.Module, b: nn.Module) -> bool:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_safetensors_round_trip_is_exact_and_atomic(tmp_path) -> None:
    source, target = _trained(seed=0), _trained(seed=1)
    assert not _same_outputs(source, target)
    path = tmp_path / "student.safetensors"
    save_weights(source, path, metadata={"model": "resnet8"})
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"model": "resnet8"}
    load_weights(target, path)
    assert _same_outputs(source, target)


def test_save_handles_views_and_shared_storage(tmp_path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    path = tmp_path / "w.safetensors"
    save_weights({"a": base, "b": base, "t": base.t(), "row": base[1]}, path)
    loaded = load_file(path)
    assert (
        torch.equal(loaded["b"], base)
        and torch.equal(loaded["t"], base.t())
        and torch.equal(loaded["row"], base[1])
    )
    with pytest.raises(KdkitError, match="safetensors"):
        save_weights({"a": base}, tmp_path / "w.pt")


def test_torch_state_dict_file_loads(tmp_path) -> None:
    source, target = _trained(seed=0), _trained(seed=1)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    load_weights(target, path)
    assert _same_outputs(source, target)


@pytest.mark.parametrize("key", ["state_dict", "model", "student"])
def test_checkpoint_dict_with_ddp_prefix_loads(tmp_path, key: str) -> None:
    source, target = _trained(seed=0), _trained(seed=1)
    path = tmp_path / "ckpt.pt"
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({key: state, "epoch": 7, "optimizer": {"lr": torch.tensor(0.1)}}, path)
    load_weights(target, path)
    assert _same_outputs(source, target)


@dataclass
class NotATensor:
    value: int


def test_pickled_objects_are_refused(tmp_path) -> None:
    path = tmp_path / "unsafe.pt"
    torch.save({"state_dict": _trained().state_dict(), "extra": NotATensor(1)}, path)
    with pytest.raises(KdkitError, match="objects other than tensors") as err:
        load_weights(_trained(), path)
    assert str(path) in str(err.value) and "NotATensor" in str(err.value)


def test_missing_file_names_the_path_and_the_config_entry(tmp_path) -> None:
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(KdkitError, match="not found") as err:
        load_weights(_trained(), path)
    assert str(path) in str(err.value) and "weights" in str(err.value)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path) -> None:
    path = tmp_path / "ten.safetensors"
    save_weights(_trained(num_classes=10), path)
    with pytest.raises(KdkitError, match="shape mismatch") as err:
        load_weights(_trained(num_classes=100), path)
    message = str(err.value)
    assert (
        "'fc.weight'" in message and "(10, 64)" in message and "(100, 64)" in message and str(path) in message
    )


def test_missing_and_unexpected_keys_are_named(tmp_path) -> None:
    path = tmp_path / "resnet8.safetensors"
    save_weights(_trained("resnet8"), path)
    with pytest.raises(KdkitError, match="missing keys layer1.1.") as err:
        load_weights(_trained("resnet14"), path)
    assert "in all" in str(err.value)  # resnet14 lacks many keys: a few are named, then the count

    state = {k: v for k, v in _trained().state_dict().items() if not k.startswith("fc.")}
    state["extra.weight"] = torch.zeros(1)
    save_weights(state, path)
    with pytest.raises(KdkitError, match=r"missing keys fc.weight, fc.bias; unexpected keys extra.weight"):
        load_weights(_trained(), path)
    missing, unexpected = load_weights(_trained(), path, strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == ["extra.weight"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_garbage_file_is_a_clear_error(tmp_path, suffix: str) -> None:
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"this is not a weights file" * 10)
    with pytest.raises(KdkitError, match="cannot read weights file") as err:
        load_weights(_trained(), path)
    assert str(path) in str(err.value)


def test_unknown_suffix_and_non_state_dict_are_clear_errors(tmp_path) -> None:
    path = tmp_path / "weights.ckpt"
    path.write_bytes(b"x")
    with pytest.raises(KdkitError, match="unknown suffix '.ckpt'"):
        load_weights(_trained(), path)
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(KdkitError, match="holds no state dict"):
        load_weights(_trained(), path)
