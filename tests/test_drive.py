"""The sensor-to-actuation loop: actuation rules, the embedded test drive, the stability metric."""

from __future__ import annotations

import csv
import hashlib
import math

import numpy as np
import pytest
import torch
from PIL import Image

from kdkit.data.road_scenes import CLASSES
from kdkit.deploy.actuation import (
    ClassActionRule,
    Corridor,
    CorridorRule,
    class_action,
    corridor_mask,
    corridor_signal,
)
from kdkit.deploy.drive import drive, read_frames
from kdkit.deploy.export import ModelSpec, export_student
from kdkit.deploy.stability import drive_stability, stability
from kdkit.deploy.testdrive import test_drive
from kdkit.errors import KdkitError
from kdkit.models import build_model

CAR = CLASSES.index("car")
BOX = Corridor(top=0.5, bottom=1.0, top_width=0.6, bottom_width=0.6)  # rows 5-9, columns 2-7 of 10x10
SHORT = ((0, "day"), (5, "night"), (9, "day"))


# ---------------------------------------------------------------- corridor rule


def test_corridor_mask_rectangle_and_trapezoid():
    box = corridor_mask(10, 10, BOX)
    assert box[:5].sum() == 0
    assert all(np.flatnonzero(box[r]).tolist() == [2, 3, 4, 5, 6, 7] for r in range(5, 10))
    # widths 0.2 -> 1.0: row 5 at t=0.1 has half-width 0.28*10/2 = 1.4 around 5 -> centres 4.5, 5.5;
    # row 9 at t=0.9 has half-width 4.6 -> every column
    trap = corridor_mask(10, 10, Corridor(top=0.5, bottom=1.0, top_width=0.2, bottom_width=1.0))
    assert np.flatnonzero(trap[5]).tolist() == [4, 5]
    assert trap[9].all()


def test_corridor_empty_road_full_speed_straight():
    speed, steer = corridor_signal(np.zeros((10, 10), np.uint8), (0,), BOX, v_max=2.0)[0]
    assert speed == 2.0 and steer == 0.0


def test_corridor_obstacle_at_known_row():
    mask = np.zeros((10, 10), np.uint8)
    mask[7, 3:6] = CAR  # 3 of the 6 corridor columns of row 7: blocked (0.5 > 0.25)
    speed, steer = corridor_signal(mask, (0,), BOX, block=0.25, v_max=2.0)[0]
    assert speed == pytest.approx(2.0 * 2 / 5)  # rows 9 and 8 free of 5
    # road pixels of rows 5-9: 5 full rows (x sum 50 each) minus x = 3.5, 4.5, 5.5
    assert steer == pytest.approx((236.5 / 47 - 5) / 5)
    mask[7, 3:6], mask[6, 2] = 0, CAR  # one column of six: 0.17 <= 0.25, not blocked
    assert corridor_signal(mask, (0,), BOX, block=0.25)[0, 0] == 1.0


def test_corridor_road_shifted_left_and_no_road():
    mask = np.full((10, 10), CLASSES.index("sidewalk"), np.uint8)
    mask[:, :5] = 0  # road in columns 0-4: centre x = 2.5 -> (2.5 - 5) / 5
    speed, steer = corridor_signal(mask, (0,), BOX)[0]
    assert steer == pytest.approx(-0.5)
    assert speed == 0.0  # columns 5-7 of 2-7 are not road in every row: blocked at the bottom
    none = corridor_signal(np.full((2, 10, 10), CAR, np.uint8), (0,), BOX)
    assert none.tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_corridor_rule_on_logits_and_errors():
    rule = CorridorRule(list(CLASSES), corridor=BOX)
    logits = torch.zeros(1, len(CLASSES), 10, 10)
    logits[0, 0] = 1.0
    logits[0, CAR, 9, 2:8] = 5.0  # the bottom row is a car: nothing free
    speed, steer = rule(logits)[0]  # the rest of row 9 (columns 0, 1, 8, 9) is symmetric: straight
    assert speed == 0.0 and steer == pytest.approx(0.0)
    with pytest.raises(KdkitError, match="class 'raod'.*did you mean 'road'"):
        CorridorRule(list(CLASSES), road=("raod",))
    with pytest.raises(KdkitError, match="segmentation logits"):
        rule(torch.zeros(2, len(CLASSES)))
    with pytest.raises(KdkitError, match="top < bottom"):
        Corridor(top=0.9, bottom=0.5)


# ---------------------------------------------------------------- class-action table


def test_class_action_argmax_and_expected():
    classes = ["stop", "slow", "go"]
    rule = ClassActionRule(classes, {"stop": 0.0, "slow": 0.5, "go": 1.0})
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 2.0, 1.0]])
    assert rule(logits)[:, 0].tolist() == [0.0, 1.0, 0.5]
    assert rule.components == ("action",)
    # softmax of (0, 0, ln 2) = (1/4, 1/4, 1/2): 0.25 * 0.5 + 0.5 * 1 = 0.625
    expected = class_action(torch.tensor([[0.0, 0.0, math.log(2)]]), rule.actions, "expected")
    assert expected[0, 0] == pytest.approx(0.625)


def test_class_action_components_default_and_errors():
    classes = ["stop", "left", "other"]
    table = {"stop": {"speed": 0.0, "steer": 0.0}, "left": {"speed": 0.5, "steer": -1.0}}
    rule = ClassActionRule(classes, table, default={"speed": 1.0, "steer": 0.0})
    assert rule.components == ("speed", "steer")
    assert rule(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])).tolist() == [[0.5, -1.0], [1.0, 0.0]]
    assert rule.from_labels([0]).tolist() == [[0.0, 0.0]]
    with pytest.raises(KdkitError, match="no action for other"):
        ClassActionRule(classes, table)
    with pytest.raises(KdkitError, match="no class 'stp'"):
        ClassActionRule(classes, {"stp": 0.0}, default=1.0)
    with pytest.raises(KdkitError, match="one per class"):
        ClassActionRule(classes, {"stop": 0.0}, default=1.0)(torch.zeros(1, 4))


# ---------------------------------------------------------------- the embedded test drive


def _digest(td) -> str:
    return hashlib.sha256(td.images.tobytes() + td.masks.tobytes() + " ".join(td.styles).encode()).hexdigest()


def test_test_drive_deterministic_cached_and_styles_as_declared(tmp_path):
    a = test_drive(12, (32, 64), SHORT, root=tmp_path / "a")
    b = test_drive(12, (32, 64), SHORT, root=tmp_path / "b")
    assert _digest(a) == _digest(b)
    assert a.images.shape == (12, 3, 32, 64) and a.masks.shape == (12, 32, 64)
    assert a.styles == ["day"] * 5 + ["night"] * 4 + ["day"] * 3 and a.changes == [5, 9]
    assert sorted(p.name for p in (a.folder / "frames").iterdir())[-1] == "00011.png"
    assert (a.folder / "styles.txt").read_text().split() == a.styles
    npz = a.folder / "drive.npz"
    stamp = npz.stat().st_mtime_ns
    assert _digest(test_drive(12, (32, 64), SHORT, root=tmp_path / "a")) == _digest(a)  # from the cache
    assert npz.stat().st_mtime_ns == stamp
    # the style changes abruptly (mean brightness) while the layout moves smoothly and ignores the style
    mean = a.images.reshape(12, -1).mean(1)
    jumps = np.abs(np.diff(mean))
    assert jumps[[4, 8]].min() > 5 * np.delete(jumps, [4, 8]).max()
    agree = (a.masks[1:] == a.masks[:-1]).mean((1, 2))
    assert agree.min() > 0.75 and agree.max() < 1.0  # the car moves, a little per frame
    day = test_drive(12, (32, 64), ((0, "day"),), root=tmp_path / "c")
    assert np.array_equal(day.masks, a.masks) and np.array_equal(day.images[:5], a.images[:5])
    with pytest.raises(KdkitError, match="no style 'nite'.*did you mean 'night'"):
        test_drive(12, (32, 64), ((0, "day"), (5, "nite")), root=tmp_path / "d")


# ---------------------------------------------------------------- stability metric


def test_stability_on_a_signal_with_a_known_jump():
    speed = np.array([0.0, 1, 2, 3, 13, 14, 15])
    signal = np.stack([speed, np.zeros(7)], 1)
    styles = ["day"] * 4 + ["night"] * 3
    reference = np.stack([np.arange(7.0), np.zeros(7)], 1)
    f = stability(signal, styles, ("speed", "steer"), reference)
    assert f["changes"] == [4]
    assert f["jump_speed"] == 10.0 and f["step_speed"] == 1.0 and f["jolt_speed"] == 10.0
    assert f["jolt_steer"] == 1.0  # no change at all: 0 / 0 reads as no jolt
    assert f["jolt"] == pytest.approx(5.5)
    assert f["mae_speed"] == pytest.approx(27 / 7)
    assert f["mae_speed_day"] == 0.0 and f["mae_speed_night"] == 9.0
    assert f["reference_jolt_speed"] == 1.0
    step_only = stability(np.array([0.0, 0, 5, 5]), ["a", "a", "b", "b"])
    assert step_only["jolt_s0"] == math.inf
    with pytest.raises(KdkitError, match="never change"):
        stability(speed, ["day"] * 7)
    # two drives pooled: the transition into the second (frame 4, 3 -> 13) counts nowhere
    pooled = stability(np.array([0.0, 1, 2, 3, 13, 15, 18, 19]), ["day"] * 6 + ["night"] * 2, starts=[4])
    assert pooled["changes"] == [6]
    assert pooled["jump_s0"] == 3.0 and pooled["step_s0"] == pytest.approx((1 + 1 + 1 + 2 + 1) / 5)


# ---------------------------------------------------------------- the loop


def test_drive_run_dir_over_a_folder_writes_csv_and_png(tmp_path, one_thread):
    torch.manual_seed(0)
    model = build_model("mini_deeplab_student", num_classes=len(CLASSES))
    spec = ModelSpec("mini_deeplab_student", len(CLASSES), classes=list(CLASSES), image_size=(32, 64))
    run = tmp_path / "run"
    export_student(model, spec, run)
    td = test_drive(12, (32, 64), SHORT, root=tmp_path / "drive")
    log = drive(run, td.folder / "frames", out_dir=tmp_path / "out", styles=td.styles, batch_size=5)
    assert log.signal.shape == (12, 2) and log.components == ("speed", "steer")
    rows = list(csv.DictReader((tmp_path / "out" / "signal.csv").open()))
    assert len(rows) == 12
    assert [r["name"] for r in rows] == td.names and [r["style"] for r in rows] == td.styles
    assert float(rows[3]["speed"]) == pytest.approx(log.signal[3, 0], abs=1e-5)
    assert Image.open(tmp_path / "out" / "signal.png").size[0] > 100
    # the same signal in one batch, from a callable, against the reference of the test drive
    model.eval()

    def runner(x01):
        mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
        with torch.no_grad():
            return model((x01 - mean) / std)

    again = drive(runner, td, batch_size=12)
    assert np.allclose(again.signal, log.signal)
    assert again.reference is not None and again.reference.shape == (12, 2)
    one = drive_stability(runner, tmp_path / "one", test=td)
    assert one["changes"] == [5, 9] and one["drives"] == 1 and "mae_steer_night" in one
    assert one["jolt_speed"] == one["per_drive"][0]["jolt_speed"]
    assert (tmp_path / "one" / "stability.json").is_file()
    header = (tmp_path / "one" / "signal.csv").read_text().splitlines()[0]
    assert header == "frame,name,style,speed,steer,speed_reference,steer_reference"
    # the same drive twice, pooled: same ratio, the join between the drives ignored
    two = drive_stability(run, tmp_path / "two", test=[td, td])
    assert two["changes"] == [5, 9, 17, 21] and two["drives"] == 2
    assert two["jolt_speed"] == pytest.approx(one["jolt_speed"]) and two["jolt"] == pytest.approx(one["jolt"])
    assert (tmp_path / "two" / "drive-1" / "signal.png").is_file()


@pytest.mark.filterwarnings("ignore:.*torch.jit.load")
def test_drive_exported_file_resizes_to_its_image_size(tmp_path):
    from kdkit.deploy.formats import Deployable, export_module, write_metadata

    torch.manual_seed(0)
    net = Deployable(torch.nn.Conv2d(3, len(CLASSES), 3, padding=1), (0.5,) * 3, (0.25,) * 3).eval()
    path = export_module(net, "torchscript", tmp_path / "student.ts", (16, 32), dynamic_batch=True)
    write_metadata(path, {"classes": list(CLASSES), "image_size": [16, 32], "dynamic_batch": True})
    frames = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 64), dtype=np.uint8)
    log = drive(path, frames)

    def small(x01):
        with torch.no_grad():
            return net(torch.nn.functional.interpolate(x01, size=(16, 32), mode="bilinear"))

    assert np.allclose(log.signal, drive(small, frames).signal)
    with pytest.raises(KdkitError, match="no class 'road'.*road=\\("):
        drive(small, frames, classes=["a"] * len(CLASSES))


def test_read_frames_multi_frame_image_and_errors(tmp_path):
    frames = [Image.new("RGB", (8, 4), (40 * i, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:])
    got = list(read_frames(tmp_path / "clip.gif"))
    assert [n for n, _ in got] == ["clip.gif#0", "clip.gif#1", "clip.gif#2"]
    assert got[0][1].shape == (3, 4, 8)
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    with pytest.raises(KdkitError, match="ffmpeg"):
        list(read_frames(tmp_path / "clip.mp4"))
    with pytest.raises(KdkitError, match="class-action table"):
        drive(lambda x: torch.zeros(len(x), 3), np.zeros((2, 3, 4, 8), np.uint8))
    # a classifier whose top class follows the red channel: frame i -> class i
    rule = ClassActionRule(["stop", "slow", "go"], {"stop": 0.0, "slow": 0.5, "go": 1.0})
    log = drive(lambda x: -((x[:, 0].mean((1, 2))[:, None] * 255 - torch.tensor([0.0, 40, 80])) ** 2),
                tmp_path / "clip.gif", rule, tmp_path / "cls")  # fmt: skip
    assert log.signal[:, 0].tolist() == [0.0, 0.5, 1.0]
    assert (tmp_path / "cls" / "signal.csv").read_text().splitlines()[1:] == [
        "0,clip.gif#0,0", "1,clip.gif#1,0.5", "2,clip.gif#2,1"
    ]  # fmt: skip
