"""Style-augmented distillation through the engine (patent US 2025/0265822): the refiner appends x'
to the batch with x's labels, content is preserved, a feature-only teacher is distilled on features,
and robustness is evaluated per style."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kdkit.api import evaluate_styles, train_from_config
from kdkit.config import load_config
from kdkit.data import build_dataset
from kdkit.errors import ConfigError, KdkitError
from kdkit.refiners import RefinerContext, StyleRefiner

TINY = {"train_size": 64, "test_size": 32, "styles": ["day"]}
NIGHT = {"name": "embedded", "params": {"train_size": 64, "test_size": 32, "styles": ["night"]}}


def _context(task="classification", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), ignore=-100):
    def build(name, root, split, params):
        return build_dataset(name, split, root=root, **params)

    return RefinerContext(task, mean, std, torch.device("cpu"), build, ["ce"], ignore)


def test_refiner_appends_styled_copies_with_the_labels_and_masks_unchanged():
    refiner = StyleRefiner(method="fourier", sources=[NIGHT], alpha=1.0, beta=0.05)
    refiner.setup(_context("segmentation", ignore=255))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    masks = torch.randint(0, 5, (4, 32, 32))
    out, labels = refiner(images, masks, g, total=4, start=0)
    assert out.shape == (8, 3, 32, 32) and torch.equal(out[:4], images)
    assert torch.equal(labels[:4], masks) and torch.equal(labels[4:], masks)  # the mask of x' is x's
    assert not torch.allclose(out[4:], images, atol=1e-2)  # x' differs in style


def test_alpha_zero_returns_x_and_unlabelled_styled_copies_are_ignored():
    refiner = StyleRefiner(method="fourier", sources=[NIGHT], alpha=0.0, label_styled=False)
    refiner.setup(_context())
    images = torch.rand(3, 3, 32, 32)
    out, labels = refiner(images, torch.tensor([1, 2, 3]), torch.Generator().manual_seed(0), 3, 0)
    assert torch.allclose(out[3:], images, atol=1e-4)
    assert labels.tolist() == [1, 2, 3, -100, -100, -100]


def test_refiner_slices_of_a_global_batch_match_one_process():
    refiner = StyleRefiner(method="fourier", sources=[NIGHT], alpha=[0.2, 1.0])
    refiner.setup(_context())
    images, labels = torch.rand(4, 3, 32, 32), torch.arange(4)
    whole, _ = refiner(images, labels, torch.Generator().manual_seed(7), 4, 0)
    halves = [
        refiner(images[i : i + 2], labels[i : i + 2], torch.Generator().manual_seed(7), 4, i)[0]
        for i in (0, 2)
    ]
    assert torch.allclose(torch.cat([h[2:] for h in halves]), whole[4:], atol=1e-6)


def test_bad_refiner_settings_are_clear_errors(tmp_path):
    with pytest.raises(KdkitError, match="unknown method 'fourir'.*fourier"):
        StyleRefiner(method="fourir", sources=[NIGHT])
    with pytest.raises(KdkitError, match="unknown aspect 'wether'.*weather"):
        StyleRefiner(sources=[NIGHT], aspects=["wether"])
    with pytest.raises(KdkitError, match="needs sources"):
        StyleRefiner(method="fourier")
    with pytest.raises(KdkitError, match="train-style"):
        StyleRefiner(method="adain", sources=[NIGHT])
    refiner = StyleRefiner(sources=[NIGHT], label_styled=False)
    ctx = _context()
    ctx.label_terms = ["ce", "dkd"]
    with pytest.raises(KdkitError, match="dkd"):
        refiner.setup(ctx)
    base = {"student": {"name": "resnet8"}, "refiners": [{"name": "styl"}]}
    with pytest.raises(ConfigError, match="unknown refiner 'styl'.*style"):
        load_config(base=base)
    base["refiners"] = [{"name": "style", "alpa": 1}]
    with pytest.raises(ConfigError, match="unknown argument of refiner 'style'.*alpha"):
        load_config(base=base)


def run_config(tmp_path, **extra):
    config = {
        "name": "styled",
        "data": {"name": "embedded", "params": TINY, "batch_size": 16, "eval_batch_size": 32},
        "student": {"name": "resnet8"},
        "terms": [{"name": "ce"}],
        "refiners": [
            {
                "name": "style",
                "method": "fourier",
                "sources": [NIGHT],
                "alpha": [0.5, 1.0],
                "aspects": ["time_of_day"],
            }
        ],
        "stages": [{"epochs": 1}],
        "runtime": {"out_dir": str(tmp_path / "runs"), "progress": False},
    }
    config.update(extra)
    return load_config(base=config)


def test_style_run_writes_the_preview_and_records_the_aspect(tmp_path):
    summary = train_from_config(run_config(tmp_path))
    run = tmp_path / "runs" / "styled"
    assert 0 <= summary["best_top1"] <= 100
    assert (run / "style_preview.png").stat().st_size > 10_000
    report = (run / "report.md").read_text()
    assert "style (method fourier" in report and "aspects: time_of_day" in report
    assert "style_preview.png" in report
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert train  # the doubled batch trained

    result = evaluate_styles(run, styles=["day", "night", "fog"])
    assert [r["style"] for r in result["rows"]] == ["day", "night", "fog"] and result["train_style"] == "day"
    assert result["rows"][0]["change"] == 0.0
    night = result["rows"][1]
    assert night["change"] == pytest.approx(night["top1"] - result["rows"][0]["top1"])  # a drop is < 0
    assert (run / "styles.png").is_file() and "change from day" in (run / "styles.md").read_text()


class TinyViT(nn.Module):
    """A foundation-model-like encoder that returns only patch tokens ``[B, N, C]`` (no task head)."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.block = nn.TransformerEncoderLayer(dim, 4, 2 * dim, batch_first=True, dropout=0.0)

    def forward(self, x):
        return self.block(self.patch(x).flatten(2).transpose(1, 2))


def test_feature_only_teacher_is_distilled_on_features_while_labels_teach_the_task(tmp_path):
    """Patent [0040]: a teacher without a task head (a tiny ViT-like encoder) is matched on features
    (student map -> teacher tokens through a connector), the student learns the classes from labels."""
    teacher = TinyViT()
    config = run_config(
        tmp_path,
        name="vit-teacher",
        teacher={"name": "module:TinyViT"},
        terms=[
            {"name": "ce"},
            {"name": "fitnet", "weight": 10.0, "student_tap": "layer3", "teacher_tap": "logits"},
        ],
    )
    summary = train_from_config(config, modules={"teacher": teacher})
    records = [
        json.loads(x) for x in (tmp_path / "runs" / "vit-teacher" / "metrics.jsonl").read_text().splitlines()
    ]
    assert not [r for r in records if r["kind"] == "teacher_eval"]  # no task head: not evaluated
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["fitnet"] > 0 and "teacher_top1" not in summary


def test_train_style_cli_then_adain_refiner(tmp_path):
    """`kdkit train-style` trains F/G (reconstruction falls), and the refiner's adain method uses the
    saved file; with a frozen teacher front as F only G is saved and F is rebuilt from the teacher."""
    from typer.testing import CliRunner

    from kdkit.cli import app
    from kdkit.models import build_model, save_weights

    common = ["--data", "embedded", "--param", "train_size=64", "--param", "test_size=8", "--steps", "40"]
    result = CliRunner().invoke(app, ["train-style", *common, "--out", str(tmp_path / "style.safetensors")])
    assert result.exit_code == 0, result.output
    first, last = (float(v) for v in result.output.split("MSE ")[1].split(";")[0].split(" -> "))
    assert last < first
    refiner = StyleRefiner(method="adain", sources=[NIGHT], model=str(tmp_path / "style.safetensors"))
    refiner.setup(_context())
    out, _ = refiner(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]), torch.Generator().manual_seed(0), 2, 0)
    assert out.shape == (4, 3, 32, 32) and torch.isfinite(out).all()

    save_weights(build_model("mini_deeplab_teacher", num_classes=10), tmp_path / "teacher.safetensors")
    front = [
        "--teacher",
        "mini_deeplab_teacher:backbone",
        "--teacher-weights",
        str(tmp_path / "teacher.safetensors"),
    ]
    result = CliRunner().invoke(
        app, ["train-style", *common, *front, "--out", str(tmp_path / "front.safetensors")]
    )
    assert result.exit_code == 0, result.output
    refiner = StyleRefiner(method="adain", sources=[NIGHT], model=str(tmp_path / "front.safetensors"))
    refiner.setup(_context())
    out, _ = refiner(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]), torch.Generator().manual_seed(0), 2, 0)
    assert out.shape == (4, 3, 32, 32)
