"""Teachers with their own inputs (issue 12 item 4): the student's batch is renormalised and resized for
the teacher, checked on hand-computed pixel values, wherever the teacher runs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kdkit.config import load_config
from kdkit.engine.teacher_input import TeacherInput, attach_teacher_input
from kdkit.errors import ConfigError, KdkitError


class Recorder(nn.Module):
    """Remembers the input it was called with (a stand-in teacher)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.conv(x).mean((2, 3))


def test_renormalisation_by_hand():
    # data: mean 0.5, std 0.25 per channel; the teacher: ImageNet-like statistics
    adapter = TeacherInput([0.5] * 3, [0.25] * 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), None, "test")
    pixel = 0.8  # a [0, 1] pixel value
    x = torch.full((1, 3, 2, 2), (pixel - 0.5) / 0.25)  # = 1.2, what the student sees
    y = adapter(x)
    want = [(0.8 - 0.485) / 0.229, (0.8 - 0.456) / 0.224, (0.8 - 0.406) / 0.225]  # 1.37555, 1.53571, 1.75111
    assert torch.allclose(y[0, :, 0, 0], torch.tensor(want), atol=1e-6)


def test_resize_to_the_teachers_size():
    adapter = TeacherInput([0.0] * 3, [1.0] * 3, None, None, (4, 6), "test")
    x = torch.arange(2 * 3 * 2 * 3, dtype=torch.float32).view(2, 3, 2, 3)
    y = adapter(x)
    assert y.shape == (2, 3, 4, 6)
    # bilinear upsampling by 2 (align_corners=False): the top-left output pixel equals the top-left input
    assert torch.allclose(y[:, :, 0, 0], x[:, :, 0, 0])


def test_attached_hook_feeds_every_teacher_call_and_keeps_module_paths():
    teacher = Recorder()
    adapter = attach_teacher_input(
        teacher,
        [0.5] * 3,
        [0.5] * 3,
        config=type("C", (), {"mean": (0.0,) * 3, "std": (1.0,) * 3, "size": None}),
    )
    assert adapter is not None and "teacher.input" in adapter.describe()
    x = torch.zeros(1, 3, 2, 2)  # the data's mean: pixel 0.5
    teacher(x)
    assert torch.allclose(teacher.seen, torch.full_like(x, 0.5))  # the teacher sees (0.5 - 0) / 1
    assert [n for n, _ in teacher.named_modules()] == ["", "conv"]


def test_a_kdkit_teacher_keeps_its_training_normalisation(tmp_path):
    (tmp_path / "student.json").write_text(
        json.dumps({"model": "resnet8", "num_classes": 10, "mean": [0.2, 0.2, 0.2], "std": [0.1, 0.1, 0.1]})
    )
    teacher = Recorder()
    adapter = attach_teacher_input(teacher, [0.5] * 3, [0.25] * 3, tmp_path / "student.safetensors")
    assert adapter is not None and adapter.size is None
    teacher(torch.zeros(1, 3, 2, 2))  # pixel 0.5 -> (0.5 - 0.2) / 0.1 = 3
    assert torch.allclose(teacher.seen, torch.full((1, 3, 2, 2), 3.0))
    same = Recorder()  # trained on the same normalisation: no hook
    assert attach_teacher_input(same, [0.2] * 3, [0.1] * 3, tmp_path / "student.safetensors") is None


def test_config_errors(tmp_path):
    with pytest.raises(KdkitError, match="std must be positive"):
        TeacherInput([0.5] * 3, [0.5] * 3, None, (1.0, 0.0, 1.0), None, "test")
    path = tmp_path / "c.yaml"
    path.write_text("student: {name: resnet8, input: {mean: [0.5, 0.5, 0.5]}}\n")
    with pytest.raises(ConfigError, match="student.input"):
        load_config(path)


def test_a_run_gives_the_teacher_its_own_input(tmp_path):
    """End to end: a run whose teacher declares ImageNet-like statistics and a larger size trains, the dry
    run builds FitNet's connector for the teacher's resolution, and the report says what was done."""
    from kdkit.api import train_from_config
    from kdkit.models import build_model, save_weights

    torch.manual_seed(0)
    weights = tmp_path / "t.safetensors"
    save_weights(build_model("resnet8", num_classes=10), weights)
    config = load_config(
        None,
        [
            "data.params.train_size=64",
            "data.params.test_size=32",
            "data.batch_size=32",
            "student.name=resnet8",
            "teacher.name=resnet8",
            f"teacher.weights={weights}",
            "teacher.input.mean=[0.485,0.456,0.406]",
            "teacher.input.std=[0.229,0.224,0.225]",
            "teacher.input.size=[48,48]",
            "terms=[{name: ce}, {name: kd}, {name: fitnet}]",
            "runtime.progress=false",
        ],
    )
    train_from_config(config, run_dir=tmp_path / "run")
    report = (tmp_path / "run" / "report.md").read_text()
    assert "teacher input (teacher.input): renormalised" in report and "resized to 48x48" in report
