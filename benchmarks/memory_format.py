"""channels_last vs the default (NCHW) memory format: one training step (forward + backward) per model.

``runtime.channels_last`` defaults to true because on this CPU every convolutional model of the zoo
trained faster in NHWC; this measures it, as ratios of medians in one run, both formats interleaved.
The step is the model's forward and the backward of the sum of its outputs (a detector's train-mode
outputs), which is what the layout changes; the loss terms and the optimizer do not depend on it.
Writes benchmarks/results/memory_format.md.
Run:  python benchmarks/memory_format.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _results import RESULTS, write_table

from kdkit.models import build_model

MODELS = [  # (name, batch shape, classes): the demos' and the CIFAR/ImageNet presets' networks
    ("resnet8", (128, 3, 32, 32), 10),
    ("resnet20", (128, 3, 32, 32), 10),
    ("resnet8x4", (64, 3, 32, 32), 10),
    ("resnet32x4", (64, 3, 32, 32), 10),
    ("torchvision:mobilenet_v3_small", (16, 3, 224, 224), 100),
    ("torchvision:resnet18", (16, 3, 224, 224), 100),
    ("mini_deeplab_student", (8, 3, 128, 256), 19),
    ("det_compact_student", (16, 3, 128, 256), 3),
]


def _outputs_sum(out) -> torch.Tensor:
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return sum(_outputs_sum(o) for o in out if isinstance(o, (torch.Tensor, list, tuple, dict)))
    return out.float().sum()


def step_seconds(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    _outputs_sum(model(x)).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for name, shape, classes in MODELS:
        torch.manual_seed(0)
        nchw = build_model(name, num_classes=classes).train()
        nhwc = build_model(name, num_classes=classes).train()
        nhwc.load_state_dict(nchw.state_dict())
        nhwc = nhwc.to(memory_format=torch.channels_last)
        x = torch.randn(*shape)
        xl = x.contiguous(memory_format=torch.channels_last)
        step_seconds(nchw, x), step_seconds(nhwc, xl)  # warm-up
        times: dict[str, list[float]] = {"nchw": [], "nhwc": []}
        for _ in range(args.repeats):
            times["nchw"].append(step_seconds(nchw, x))
            times["nhwc"].append(step_seconds(nhwc, xl))
        a, b = statistics.median(times["nchw"]), statistics.median(times["nhwc"])
        rows.append(f"| {name} | {'x'.join(map(str, shape))} | {a * 1e3:.0f} | {b * 1e3:.0f} | {b / a:.2f} |")
        print(rows[-1], flush=True)
    write_table(
        RESULTS / "memory_format.md",
        [
            f"# channels_last vs NCHW: a training step ({torch.get_num_threads()} threads, fp32)",
            "",
            f"Forward + backward, median of {args.repeats} interleaved steps each "
            "(`python benchmarks/memory_format.py`).",
            "",
            "| model | batch | NCHW (ms) | channels_last (ms) | channels_last / NCHW |",
            "|---|---|---|---|---|",
            *rows,
        ],
    )


if __name__ == "__main__":
    main()
