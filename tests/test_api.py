"""The Python API without a config file."""

from __future__ import annotations

import torch

import kdkit


def test_distill_with_names_and_with_modules(tmp_path):
    teacher_weights = tmp_path / "teacher.safetensors"
    kdkit.save_weights(kdkit.build_model("resnet20", num_classes=10), teacher_weights)
    runtime = kdkit.RuntimeConfig(out_dir=str(tmp_path / "runs"), progress=False)
    data = {"train_size": 128, "test_size": 64}
    summary = kdkit.distill(
        student="resnet8",
        teacher="resnet20",
        teacher_weights=teacher_weights,
        data_params=data,
        terms={"ce": 0.1, "kd": (0.9, {"temperature": 4})},
        epochs=1,
        batch_size=32,
        runtime=runtime,
        name="by-name",
    )
    assert 0 <= summary["best_top1"] <= 100 and "teacher_top1" in summary
    student, spec = kdkit.load_student(tmp_path / "runs" / "by-name")
    assert spec.model == "resnet8" and spec.num_classes == 10 and spec.image_size == (32, 32)
    assert student(torch.zeros(1, 3, 32, 32)).shape == (1, 10)

    module = kdkit.build_model("resnet8", num_classes=10)
    before = module.fc.weight.detach().clone()
    settings = {"data_params": data, "epochs": 1, "batch_size": 32, "runtime": runtime}
    kdkit.distill(module, None, terms={"ce": 1.0}, name="mod", **settings)
    assert not torch.equal(before, module.fc.weight.detach())  # the caller's module was trained in place
    assert (tmp_path / "runs" / "mod" / "student.safetensors").is_file()
