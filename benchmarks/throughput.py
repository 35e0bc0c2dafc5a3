"""Training-step throughput as ratios measured in one run (this machine is noisy; ratios are stable).

Compares, for the demo's pair (ResNet-20 teacher -> ResNet-8 student, batch 128, 32x32):
  * fp32 vs bf16 autocast, contiguous vs channels_last, for the student alone;
  * a plain PyTorch KD step vs kdkit's Distiller step (taps, StepView, terms) - the engine's overhead.
Writes benchmarks/results/throughput.md.  Run:  python benchmarks/throughput.py [--steps 20]
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from _results import RESULTS, write_table

from kdkit.engine.distiller import Distiller, WeightedTerm
from kdkit.models import build_model
from kdkit.terms import CE, KD


def timed(step, steps: int) -> float:
    """Images per second of ``step`` over ``steps`` calls after 3 warm-up calls (median of 3 blocks)."""
    for _ in range(3):
        step()
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(128 * steps / (time.perf_counter() - start))
    return sorted(rates)[1]


def make_step(model, teacher, precision: str, channels_last: bool, engine: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (128,))
    model = model.to(memory_format=fmt)
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    if engine:
        distiller = Distiller(
            model, teacher, [[WeightedTerm("ce", 0.1, CE()), WeightedTerm("kd", 0.9, KD())]]
        )
        distiller.setup(x[:2])
        distiller.train()
        params = list(model.parameters())
    else:
        params = list(model.parameters())
        if teacher is not None:
            teacher.eval()
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def step():
        with cast:
            if engine:
                loss, _, _ = distiller(x, y)
            else:
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                if teacher is not None:
                    with torch.no_grad():
                        t = teacher(x)
                    loss = 0.1 * loss + 0.9 * 16 * F.kl_div(
                        F.log_softmax(logits.float() / 4, 1),
                        F.log_softmax(t.float() / 4, 1),
                        reduction="batchmean",
                        log_target=True,
                    )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS / "throughput.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # as kdkit does on the CPU (see kdkit.engine.distributed.resolve_device)
    rows = []
    base = None
    for precision in ("fp32", "bf16"):
        for cl in (False, True):
            rate = timed(
                make_step(build_model("resnet8", num_classes=10), None, precision, cl, False), args.steps
            )
            base = base or rate
            rows.append(
                (f"student alone, {precision}, {'channels_last' if cl else 'contiguous'}", rate, rate / base)
            )
    teacher = build_model("resnet20", num_classes=10)
    plain = timed(
        make_step(build_model("resnet8", num_classes=10), teacher, "bf16", False, False), args.steps
    )
    engine = timed(
        make_step(build_model("resnet8", num_classes=10), teacher, "bf16", False, True), args.steps
    )
    rows.append(("KD step, plain PyTorch, bf16", plain, 1.0))
    rows.append(("KD step, kdkit Distiller, bf16", engine, engine / plain))
    lines = [
        f"# Training throughput ({torch.__version__}, {torch.get_num_threads()} threads, batch 128, 32x32)",
        "",
        "| setting | images/s | ratio |",
        "|---|---|---|",
        *[f"| {name} | {rate:.0f} | {ratio:.2f} |" for name, rate, ratio in rows],
        "",
        "Ratios: the first four rows against fp32 contiguous; the Distiller row against the plain KD step.",
        "",
    ]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
