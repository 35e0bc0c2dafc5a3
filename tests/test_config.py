"""Config schema: YAML loading, overrides, and one-line errors that name the place and the fix."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.config import apply_override, load_config
from kdkit.errors import ConfigError

GOOD = """\
name: ok
data:
  name: embedded
  params: {train_size: 200, test_size: 100}
teacher:
  name: resnet20
student:
  name: resnet8
terms:
  - name: ce
  - name: kd
    weight: 0.9
    temperature: 4
stages:
  - epochs: 2
    optimizer: {name: sgd, lr: 0.05}
    schedule: {name: multistep, milestones: [1]}
"""


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_good_config_loads_with_defaults(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.student.name == "resnet8"
    assert config.terms[1].params == {"temperature": 4}
    assert config.terms[1].weight == 0.9
    assert config.stages[0].train == ["*"]
    assert config.runtime.precision == "fp32"


def test_overrides_parse_yaml_values_and_index_lists(tmp_path):
    config = load_config(
        write(tmp_path, GOOD), ["stages.0.epochs=7", "terms[1].temperature=2.5", "runtime.precision=bf16"]
    )
    assert config.stages[0].epochs == 7
    assert config.terms[1].params["temperature"] == 2.5
    assert config.runtime.precision == "bf16"


def test_apply_override_creates_nested_mappings():
    data: dict = {}
    apply_override(data, "data.params.styles=[day, fog]")
    assert data == {"data": {"params": {"styles": ["day", "fog"]}}}


def test_base_file_is_deep_merged(tmp_path):
    write(tmp_path, GOOD, "base.yaml")
    config = load_config(write(tmp_path, "base: base.yaml\nname: child\nstudent: {name: resnet14}\n"))
    assert (config.name, config.student.name, config.teacher.name) == ("child", "resnet14", "resnet20")


# Ten malformed configs: (lines after "base: good.yaml", expected fragments of the one-line message;
# line numbers count the base line).
MALFORMED = [
    (
        "stages:\n  - epochs: 2\n    optimiser: {lr: 0.1}\n",
        ["run.yaml:4", "optimiser", "did you mean 'optimizer'"],
    ),
    ("runtime:\n  precison: bf16\n", ["run.yaml:3", "precison", "did you mean 'precision'"]),
    ("runtime:\n  precision: fp8\n", ["runtime.precision", "'fp8'", "fp32", "bf16"]),
    ("stages:\n  - epochs: many\n", ["stages[0].epochs", "integer"]),
    ("stages:\n  - epochs: 2\n    steps: 10\n", ["exactly one of 'epochs' and 'steps'"]),
    (
        "teacher:\n  name: resnet20\n  weights: missing/teacher.safetensors\n",
        ["teacher.weights", "not found", "missing/teacher.safetensors"],
    ),
    ("terms:\n  - name: kdd\n", ["run.yaml:3", "unknown term 'kdd'", "did you mean 'kd'"]),
    (
        "terms:\n  - name: kd\n    tempreature: 4\n",
        ["run.yaml:4", "tempreature", "did you mean 'temperature'"],
    ),
    ("student:\n  name: resnet9\n", ["unknown model 'resnet9'", "did you mean"]),
    ("data:\n  name: cifar1000\n", ["unknown dataset 'cifar1000'", "did you mean 'cifar100'"]),
]


@pytest.mark.parametrize("patch,fragments", MALFORMED, ids=[m[1][-1][:24] for m in MALFORMED])
def test_malformed_config_gives_one_line_error(tmp_path, patch, fragments):
    base = write(tmp_path, GOOD, "good.yaml")
    bad = write(tmp_path, f"base: good.yaml\n{patch}")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment.replace("run.yaml", str(bad)) in message, message
    assert base.exists()


def test_cli_prints_one_line_and_no_traceback(tmp_path):
    write(tmp_path, GOOD, "good.yaml")
    bad = write(tmp_path, "base: good.yaml\nterms:\n  - name: kd\n    tempreature: 4\n")
    result = CliRunner().invoke(app, ["train", str(bad)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "did you mean 'temperature'" in lines[0]


def test_unknown_tap_is_an_error_before_training(tmp_path):
    write(tmp_path, GOOD, "good.yaml")
    weights = tmp_path / "t.safetensors"
    from kdkit.models import build_model, save_weights

    save_weights(build_model("resnet20", num_classes=10), weights)
    bad = write(
        tmp_path,
        f"base: good.yaml\nteacher: {{name: resnet20, weights: {weights}}}\n"
        "terms:\n  - name: fitnet\n    student_tap: layer9\n    teacher_tap: layer2\n",
    )
    result = CliRunner().invoke(app, ["train", str(bad), "--set", f"runtime.out_dir={tmp_path / 'runs'}"])
    assert result.exit_code == 2, result.output
    assert "student has no module 'layer9'" in result.output and "did you mean" in result.output
    assert not (tmp_path / "runs" / "ok" / "checkpoints").exists()


def test_real_process_error_has_no_traceback(tmp_path):
    bad = write(tmp_path, "student: {name: resnet8}\nruntime: {precison: bf16}\n")
    proc = subprocess.run([sys.executable, "-m", "kdkit", "train", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        line for line in proc.stderr.splitlines() if "precison" in line
    ]
