"""The sensor-to-actuation loop (patent claim 15, [0068]) and its stability under style change ([0043]).

- :func:`drive` feeds a stream of frames (a folder of images in name order, a multi-frame image such
  as an animated GIF/PNG/WebP or a TIFF stack, an array, or the embedded :func:`test_drive`) to a
  student, turns each output into an actuation signal with a rule of :mod:`kdkit.deploy.actuation`
  and writes ``signal.csv`` and ``signal.png``. The student is a run directory (``load_student``), a
  file of ``kdkit export`` (.onnx / .ts / .pt2) or any callable ``images01 [B,3,H,W] in [0,1] ->
  logits``. Video files (mp4, ...) are not read: this torchvision has no video decoder and kdkit adds
  no dependency for one; extract the frames first (``ffmpeg -i drive.mp4 frames/%05d.png``).
- The embedded test drive is :mod:`kdkit.deploy.testdrive`; the stability metric under style change
  ([0043]) is :mod:`kdkit.deploy.stability`.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageSequence
from torch import Tensor, nn

from ..data.road_scenes import CLASSES
from ..errors import KdkitError
from ..taps import main_output
from .actuation import CorridorRule
from .testdrive import TestDrive, style_changes

Runner = Callable[[Tensor], Any]
Rule = Callable[[Tensor], np.ndarray]
EXPORTED = (".onnx", ".ts", ".pt2")  # files of `kdkit export` (kdkit.deploy.formats.FORMATS)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


# ---------------------------------------------------------------- the student as a runner


class TorchRunner:
    """A PyTorch network as ``images01 [B,3,H,W] in [0,1] -> logits``: normalises with ``mean``/``std``
    and, when ``image_size`` is given and the frames differ, resizes them (bilinear) to it first."""

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: Sequence[int] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.image_size = tuple(image_size) if image_size else None

    @classmethod
    def from_run(
        cls, run_dir: str | Path, device: str | torch.device = "cpu"
    ) -> tuple[TorchRunner, list[str]]:
        """The exported network of a run directory and its class names."""
        from .export import load_student

        model, spec = load_student(run_dir)
        return cls(model, spec.mean, spec.std, spec.image_size, device), list(spec.classes)

    @torch.no_grad()
    def __call__(self, images01: Tensor) -> Tensor:
        x = images01.to(self.device, torch.float32)
        if self.image_size and tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return main_output(self.model((x - self.mean) / self.std)).float().cpu()


def _exported_runner(path: Path) -> tuple[Runner, list[str]]:
    """An exported file (``kdkit export``: .onnx / .ts / .pt2, normalisation folded in) as a runner that
    resizes frames to the exported ``image_size``, and its class names (from its metadata)."""
    from .formats import read_metadata
    from .runtime import load_runtime

    meta = read_metadata(path)
    run, size = load_runtime(path), tuple(meta["image_size"])

    def runner(x01: Tensor) -> Tensor:
        if tuple(x01.shape[-2:]) != size:
            x01 = F.interpolate(x01, size=size, mode="bilinear", align_corners=False)
        return run(x01)

    return runner, list(meta.get("classes", []))


# ---------------------------------------------------------------- frame streams


def read_frames(source: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, uint8 [3,H,W])`` in order from a folder of images (sorted by file name) or a
    multi-frame image file (GIF, APNG, WebP, TIFF; names ``<file>#<index>``)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise KdkitError(
                f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}; give a folder of frames"
            )
        for p in files:
            with Image.open(p) as im:
                yield p.name, _chw(im)
        return
    if not path.is_file():
        raise KdkitError(f"no frames at {path}: give a folder of images or a multi-frame image file")
    try:
        image = Image.open(path)
    except (OSError, ValueError):
        raise KdkitError(
            f"cannot read {path} as images (video files are not supported: extract the frames, e.g. "
            f"ffmpeg -i {path.name} frames/%05d.png, and give the folder)"
        ) from None
    with image:
        for i, frame in enumerate(ImageSequence.Iterator(image)):
            yield f"{path.name}#{i}", _chw(frame)


def _chw(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).transpose(2, 0, 1).copy()


def _frame_source(
    frames: Any,
) -> tuple[Iterable[tuple[str, np.ndarray]], list[str] | None, np.ndarray | None]:
    """(stream of (name, image), styles if known, ground-truth masks if known)."""
    if isinstance(frames, TestDrive):
        return zip(frames.names, frames.images, strict=True), list(frames.styles), frames.masks
    if isinstance(frames, (str, Path)):
        return read_frames(frames), None, None
    if isinstance(frames, (np.ndarray, Tensor)):
        arr = frames.cpu().numpy() if isinstance(frames, Tensor) else frames
        if arr.ndim != 4 or arr.shape[1] != 3 or arr.dtype != np.uint8:
            raise KdkitError(
                f"frames as an array must be uint8 [N,3,H,W], got {arr.dtype} {tuple(arr.shape)}"
            )
        return ((f"{i:05d}", a) for i, a in enumerate(arr)), None, None
    return ((f"{i:05d}", np.asarray(a)) for i, a in enumerate(frames)), None, None


# ---------------------------------------------------------------- the loop


@dataclass
class DriveLog:
    """The signal of a drive: ``signal [N,K]`` with columns ``components``, per frame ``names`` and, when
    known, ``styles`` and ``reference`` (the rule applied to the ground truth)."""

    names: list[str]
    components: tuple[str, ...]
    signal: np.ndarray
    styles: list[str] | None = None
    reference: np.ndarray | None = None
    files: dict[str, Path] = field(default_factory=dict)


def _make_rule(rule: Rule | None, classes: Sequence[str] | None, output: Tensor) -> Rule:
    if rule is not None:
        return rule
    if output.ndim == 4:
        return CorridorRule(list(classes) if classes else list(CLASSES))
    raise KdkitError(
        f"no actuation rule for outputs of shape {tuple(output.shape)}: give a class-action table "
        "(e.g. ClassActionRule(classes, {'stop': 0.0, 'go': 1.0}))"
    )


def model_classes(path: str | Path) -> list[str]:
    """The class names of a run directory or of a file of ``kdkit export`` (from its metadata)."""
    path = Path(path)
    if path.suffix in EXPORTED:
        from .formats import read_metadata

        return list(read_metadata(path)["classes"])
    from .export import read_spec

    spec = read_spec(path)
    return spec.classes or [str(i) for i in range(spec.num_classes)]


def _resolve(
    model_or_run: str | Path | Runner, classes: Sequence[str] | None, device: str | torch.device
) -> tuple[Runner, Sequence[str] | None]:
    """(runner, class names) of a run directory, an exported file or a callable."""
    if isinstance(model_or_run, (str, Path)) and Path(model_or_run).suffix in EXPORTED:
        runner, names = _exported_runner(Path(model_or_run))
    elif isinstance(model_or_run, (str, Path)):
        runner, names = TorchRunner.from_run(model_or_run, device)
    elif callable(model_or_run):
        return model_or_run, classes
    else:
        raise KdkitError(
            f"drive needs a run directory, an exported file or a callable, got {type(model_or_run).__name__}"
        )
    return runner, classes or names


def drive(
    model_or_run: str | Path | Runner,
    frames: Any,
    rule: Rule | None = None,
    out_dir: str | Path | None = None,
    *,
    classes: Sequence[str] | None = None,
    styles: Sequence[str] | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> DriveLog:
    """Run a student over a stream of frames and write its actuation signal (claim 15).

    ``model_or_run``: a run directory / ``student.safetensors`` (loaded with ``load_student``), a
    file of ``kdkit export`` (.onnx via ONNX Runtime, .ts, .pt2; see ``kdkit.deploy.runtime``) or a
    callable ``images01 [B,3,H,W] float in [0,1] -> logits``. Run directories and exported files get
    the frames resized (bilinear) to their ``image_size`` when the sizes differ.

    ``frames``: a folder or multi-frame image (:func:`read_frames`), a :class:`TestDrive`, a uint8
    array ``[N,3,H,W]`` or an iterable of ``[3,H,W]`` uint8 arrays, processed in order in batches of
    ``batch_size``. ``rule``: a callable ``logits -> [B,K]`` with ``components`` (default:
    :class:`~kdkit.deploy.actuation.CorridorRule` for segmentation logits; a classifier needs a
    :class:`~kdkit.deploy.actuation.ClassActionRule`). ``classes`` defaults to the model's.
    ``styles`` (one per frame) marks the style changes in the plot; a TestDrive brings its own, and
    its masks give the reference signal (the rule on the ground truth). With ``out_dir``:
    ``signal.csv`` and ``signal.png``.
    """
    if batch_size < 1:
        raise KdkitError(f"batch_size must be at least 1, got {batch_size}")
    runner, classes = _resolve(model_or_run, classes, device)
    stream, known_styles, masks = _frame_source(frames)
    styles = list(styles) if styles is not None else known_styles
    names: list[str] = []
    signals: list[np.ndarray] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        nonlocal rule
        x = torch.from_numpy(np.stack(batch)).float().div_(255)
        out = main_output(runner(x))
        out = torch.as_tensor(out) if not isinstance(out, Tensor) else out
        rule = _make_rule(rule, classes, out)
        signals.append(np.asarray(rule(out), np.float64).reshape(len(batch), -1))
        batch.clear()

    for name, image in stream:
        if image.ndim != 3 or image.shape[0] != 3:
            raise KdkitError(f"frame {name} is not an RGB image [3,H,W] (shape {tuple(image.shape)})")
        if batch and image.shape != batch[0].shape:
            raise KdkitError(
                f"frame {name} has size {image.shape[1:]}, unlike {batch[0].shape[1:]}; resize the frames"
            )
        names.append(name)
        batch.append(image)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not names:
        raise KdkitError("the frame stream is empty")
    if styles is not None and len(styles) != len(names):
        raise KdkitError(f"{len(styles)} styles for {len(names)} frames; give one style per frame")
    assert rule is not None
    reference = None
    if masks is not None and hasattr(rule, "from_mask"):
        reference = np.asarray(rule.from_mask(masks), np.float64)
    components = tuple(getattr(rule, "components", [f"s{k}" for k in range(signals[0].shape[1])]))
    log = DriveLog(names, components, np.concatenate(signals), styles, reference)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        log.files["csv"] = write_csv(log, out / "signal.csv")
        log.files["png"] = plot_signal(log, out / "signal.png")
    return log


def write_csv(log: DriveLog, path: Path) -> Path:
    """``frame,name[,style],<components>[,<component>_reference...]``, one row per frame."""
    header = ["frame", "name"] + (["style"] if log.styles else []) + list(log.components)
    if log.reference is not None:
        header += [f"{c}_reference" for c in log.components]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for i, name in enumerate(log.names):
            row: list[Any] = [i, name] + ([log.styles[i]] if log.styles else [])
            row += [f"{v:.6g}" for v in log.signal[i]]
            if log.reference is not None:
                row += [f"{v:.6g}" for v in log.reference[i]]
            w.writerow(row)
    return path


def plot_signal(log: DriveLog, path: Path) -> Path:
    """One panel per component over the frames; style segments shaded and labelled, changes as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, n = len(log.components), len(log.names)
    fig, axes = plt.subplots(k, 1, figsize=(8, 1.2 + 1.6 * k), sharex=True, squeeze=False)
    t = np.arange(n)
    segments = []
    if log.styles:
        starts = [0, *style_changes(log.styles)]
        segments = list(zip(starts, [*starts[1:], n], [log.styles[s] for s in starts], strict=True))
    for j, (ax, name) in enumerate(zip(axes[:, 0], log.components, strict=True)):
        ax.plot(t, log.signal[:, j], lw=1.4, label="student")
        if log.reference is not None:
            ax.plot(t, log.reference[:, j], lw=1.0, ls="--", color="k", alpha=0.7, label="ground truth")
        for a, b, style in segments:
            if style != "day":
                ax.axvspan(a - 0.5, b - 0.5, color="0.85", lw=0)
            if a > 0:
                ax.axvline(a - 0.5, color="tab:red", lw=0.8)
            if j == 0:
                ax.text((a + b) / 2, 1.02, style, transform=ax.get_xaxis_transform(), ha="center", fontsize=8)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="lower right", fontsize=7)
    axes[-1, 0].set_xlabel("frame")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
