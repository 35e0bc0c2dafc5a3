"""The ImageNet-style input pipeline (issue 12): images/s of decoding + random-resized crop in 0, 1 and 2
DataLoader workers, against the training step it feeds, measured in one run.

Data: ``--images`` JPEGs of 500x375 (ImageNet's typical size; smooth random content, about 30 KB each)
in class folders, read by ``image_folder`` and cropped to 224 with ``data.augment.resized_crop`` + flip,
batch 32; and the same with mixup/CutMix (each image decodes its partner too). Step: torchvision
ResNet-18 at 224x224, batch 32, SGD, at the run's default precision here
(``auto``: bf16 autocast where the CPU has it) with channels_last, and the same step with a frozen
ResNet-34 teacher and KD. Whichever is slower bounds an epoch.
Writes benchmarks/results/input_pipeline.md.
Run:  python benchmarks/input_pipeline.py [--images 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _results import RESULTS, write_table
from PIL import Image

from kdkit.config import AugmentConfig
from kdkit.data import build_dataset
from kdkit.engine.batches import Batches
from kdkit.engine.distributed import DistInfo
from kdkit.engine.evaluate import autocast, resolve_precision
from kdkit.engine.tasks import build_task
from kdkit.models import build_model

BATCH = 32


def write_images(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
        small.resize((500, 375), Image.BICUBIC).save(folder / f"{i}.jpg", quality=90)


def pipeline_rate(root: Path, workers: int, mixup: bool = False) -> float:
    data = build_dataset("image_folder", "train", root=str(root), mean=(0.5,) * 3, std=(0.25,) * 3)
    config = AugmentConfig(resized_crop={"size": 224}, flip=True, mixup={} if mixup else None)
    task = build_task("classification", data)
    batches = Batches(
        data,
        BATCH,
        DistInfo(),
        train=True,
        num_workers=workers,
        decode=task.decoder(config),
        mixup=task.mixer(config),
    )
    augment = task.augmenter(config)
    from kdkit.data.draws import sample_keys

    start, seen = time.perf_counter(), 0
    for images, labels, idx in batches.epoch((0, 0, 0), indices=True):
        augment(images, labels, sample_keys(idx, "augment", 0, 0, 0))
        seen += len(idx)
    return seen / (time.perf_counter() - start)


def step_rate(teacher_name: str | None, precision: str, steps: int = 4) -> float:
    torch.manual_seed(0)
    student = build_model("torchvision:resnet18", num_classes=1000).to(memory_format=torch.channels_last)
    teacher = build_model(f"torchvision:{teacher_name}", num_classes=1000).eval() if teacher_name else None
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(BATCH, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (BATCH,))
    device = torch.device("cpu")

    def step() -> None:
        with autocast(device, precision):
            logits = student(x)
            loss = F.cross_entropy(logits.float(), y)
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(x.contiguous(memory_format=torch.channels_last)).float()
                loss = 0.5 * loss + 0.5 * F.kl_div(
                    F.log_softmax(logits.float(), 1),
                    F.log_softmax(t, 1),
                    reduction="batchmean",
                    log_target=True,
                )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return BATCH * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS / "input_pipeline.md")
    args = parser.parse_args()
    precision = resolve_precision("auto", torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root, args.images)
        rates = {w: pipeline_rate(root, w) for w in (0, 1, 2)}
        mixed = {w: pipeline_rate(root, w, mixup=True) for w in (0, 2)}
    student, kd = step_rate(None, precision), step_rate("resnet34", precision)
    rows = [
        f"| pipeline, {w} worker{'s' if w != 1 else ''} | {r:.0f} | {r / kd:.1f} |" for w, r in rates.items()
    ] + [f"| pipeline + mixup/CutMix, {w} workers | {r:.0f} | {r / kd:.1f} |" for w, r in mixed.items()]
    lines = [
        f"# Input pipeline vs training step ({os.cpu_count()} CPU cores, {torch.get_num_threads()} threads)",
        "",
        f"JPEG 500x375 -> random-resized crop 224 + flip, batch {BATCH}; step at {precision}, channels_last.",
        "",
        "| what | images/s | / KD step |",
        "|---|---|---|",
        *rows,
        f"| ResNet-18 step (student alone) | {student:.1f} | {student / kd:.2f} |",
        f"| ResNet-34 -> ResNet-18 KD step | {kd:.1f} | 1.00 |",
        "",
    ]
    bound = (
        "the training step bounds an epoch" if max(rates[1], rates[2]) > kd else "decoding bounds an epoch"
    )
    lines += [
        f"With 0 workers decoding runs in the training process and adds {100 * kd / rates[0]:.0f} % to a KD",
        f"step's time; with workers it overlaps the step, and here {bound}.",
        "",
    ]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
