"""kdkit vs torchdistill (PyPI) on the same KD job: one epoch, epoch time as ratios measured in one run.

The job, for both: the same embedded 32x32 training images (10 classes; 5,120 for the small pair, 1,280 for
the large one), the same networks (kdkit's
CIFAR ResNets: ResNet-20 -> ResNet-8 and ResNet-32x4 -> ResNet-8x4, random teacher weights: the time
does not depend on them), batch 64, SGD lr 0.05 momentum 0.9, random crop (padding 4) + flip, loss
0.1 CE + 0.9 T^2 KL at T 4 (kdkit: ``ce`` 0.1 + ``kd`` 0.9; torchdistill: ``KDLoss`` alpha 0.1).
Each framework runs its own way:

- kdkit: ``train_from_config`` (in-memory batches, augmentation on the batch tensor, the Distiller's
  taps) with its defaults (``precision: fp32``, ``channels_last: true``), at fp32 in torchdistill's
  layout (``channels_last: false``), and with a warm teacher-output cache (the run after one that
  filled it); evaluation excluded (training windows of ``metrics.jsonl``).
- torchdistill 1.x: ``DistillationBox`` from a config in its documented format (``WeightedSumLoss`` with a
  ``KDLoss`` sub-term, frozen teacher, ``forward_batch_only``), its CIFAR pipeline (PIL images,
  ``RandomCrop(32, 4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` in DataLoader workers;
  ``--workers``, default 2 = this machine's cores) and its training loop (``pre_epoch_process``,
  ``forward_process``, ``post_forward_process``) at fp32, its only precision without an accelerator.

torchdistill is not a kdkit dependency: install it in this benchmark's own environment, e.g.
``python -m venv .venv-td && .venv-td/bin/pip install torchdistill -e .`` and run this file with it.
Writes benchmarks/results/vs_torchdistill.md.
Run:  .venv-td/bin/python benchmarks/vs_torchdistill.py [--rounds 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _results import RESULTS, random_teacher, write_table
from PIL import Image
from teacher_cache import epoch_seconds
from torch.utils.data import Dataset, RandomSampler
from torchvision import transforms

from kdkit.api import train_from_config
from kdkit.config import load_config
from kdkit.data import build_dataset
from kdkit.models import build_model, load_weights

PAIRS = {  # pair, training images (fewer for the slow pair: the ratio does not depend on the count)
    "ResNet-20 -> ResNet-8": (("resnet20", "resnet8"), 5120),
    "ResNet-32x4 -> ResNet-8x4": (("resnet32x4", "resnet8x4"), 1280),
}
BATCH = 64


class PilImages(Dataset):
    """The embedded training images as torchvision's CIFAR datasets give them: PIL images + transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std) -> None:
        self.images = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
        self.labels = labels.tolist()
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), self.labels[index]


def torchdistill_epoch(
    teacher_name: str, student_name: str, weights: Path, workers: int, train: int
) -> float:
    from torchdistill.core.distillation import get_distillation_box

    data = build_dataset("embedded", "train", train_size=train, test_size=64)
    dataset = PilImages(data.images, data.labels, data.mean, data.std)
    torch.manual_seed(0)
    teacher = build_model(teacher_name, num_classes=10)
    load_weights(teacher, weights)
    student = build_model(student_name, num_classes=10)
    kd = {
        "key": "KDLoss",
        "kwargs": {
            "student_module_path": ".",
            "student_module_io": "output",
            "teacher_module_path": ".",
            "teacher_module_io": "output",
            "temperature": 4.0,
            "alpha": 0.1,
            "reduction": "batchmean",
        },
    }
    config = {
        "num_epochs": 1,
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": RandomSampler, "kwargs": None},
            "kwargs": {"batch_size": BATCH, "num_workers": workers, "pin_memory": False, "drop_last": True},
        },
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {"sub_terms": {"kd": {"criterion": kd, "weight": 1.0}}},
        },
    }
    device = torch.device("cpu")
    box = get_distillation_box(teacher, student, {"train": dataset}, config, device, None, False, 1)
    box.pre_epoch_process(epoch=0)
    start = time.perf_counter()
    for sample_batch, targets, supp_dict in box.train_data_loader:
        loss = box.forward_process(sample_batch.to(device), targets.to(device), supp_dict)
        box.post_forward_process(loss=loss)
    return time.perf_counter() - start


def kdkit_epoch(tmp: Path, pair: tuple[str, str], weights: Path, train: int, name: str, **runtime) -> float:
    """One kdkit KD epoch (training windows of ``metrics.jsonl``, evaluation excluded)."""
    teacher, student = pair
    config = load_config(
        base={
            "name": name,
            "data": {
                "name": "embedded",
                "params": {"train_size": train, "test_size": 64},
                "batch_size": BATCH,
            },
            "teacher": {"name": teacher, "weights": str(weights)},
            "student": {"name": student},
            "terms": [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9, "temperature": 4}],
            "stages": [{"epochs": 1, "optimizer": {"lr": 0.05}}],
            "runtime": {"out_dir": str(tmp / "runs"), "progress": False, "log_every": 5, **runtime},
        }
    )
    train_from_config(config)
    return epoch_seconds(tmp / "runs" / name, BATCH)


# (column, kdkit runtime settings); "cached" runs after a run that filled the same cache (not timed)
KDKIT = {
    "default": {},
    "fp32 NCHW": {"channels_last": False},
    "cached": {"teacher_cache": {"enabled": True}},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "vs_torchdistill.md")
    args = parser.parse_args()
    import torchdistill

    from kdkit.engine.evaluate import resolve_precision

    auto = resolve_precision("auto", torch.device("cpu"))
    lines = [
        f"# kdkit vs torchdistill {torchdistill.__version__}: a KD epoch ({torch.get_num_threads()} threads)",
        "",
        f"Batch {BATCH}, 0.1 CE + 0.9 KD (T 4), one epoch (images per pair below); median of "
        f"{args.rounds} interleaved rounds; torchdistill with {args.workers} DataLoader workers, fp32 "
        f"(its only precision without an accelerator). kdkit's default: `precision: fp32`, "
        f"`channels_last: true` (`precision: auto` resolves to {auto} on this CPU). "
        "`cached`: the same kdkit job run again with `runtime.teacher_cache.enabled` after a run that "
        "filled the cache (another student, term or method on the same teacher and data).",
        "",
        "| pair | images | torchdistill (s) | kdkit default (s) | kdkit fp32 NCHW (s) | kdkit cached (s) "
        "| torchdistill / kdkit default | torchdistill / kdkit fp32 NCHW | torchdistill / kdkit cached |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    per_round = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for label, (pair, train) in PAIRS.items():
            weights = random_teacher(tmp, pair[0])
            times: dict[str, list[float]] = {"td": [], **{k: [] for k in KDKIT}}
            for r in range(args.rounds):
                times["td"].append(torchdistill_epoch(*pair, weights, args.workers, train))
                for column, runtime in KDKIT.items():
                    if column == "cached":
                        runtime = {"teacher_cache": {"enabled": True, "dir": str(tmp / f"cache-{r}")}}
                        kdkit_epoch(tmp, pair, weights, train, f"{pair[0]}-fill-{r}", **runtime)
                    name = f"{pair[0]}-{column.replace(' ', '-')}-{r}"
                    times[column].append(kdkit_epoch(tmp, pair, weights, train, name, **runtime))
                print(label, {k: [round(t, 2) for t in v] for k, v in times.items()}, flush=True)
            td, default, nchw, cached = (statistics.median(v) for v in times.values())
            lines.append(
                f"| {label} | {train} | {td:.2f} | {default:.2f} | {nchw:.2f} | {cached:.2f} "
                f"| {td / default:.2f} | {td / nchw:.2f} | {td / cached:.2f} |"
            )
            per_round.append(
                f"- {label}: "
                + "; ".join(f"{k} {' / '.join(f'{t:.2f}' for t in v)}" for k, v in times.items())
            )
    write_table(args.out, [*lines, "", "Per round (s):", "", *per_round, ""])


if __name__ == "__main__":
    main()
