"""What CRD's memory banks hold at the end of a run: how alike the samples' embeddings are (mean cosine
between rows), whether they carry the classes (5-nearest-neighbour and nearest-class-centroid accuracy
of each bank on the training labels), and how the student bank sits against the teacher bank (cosine
of their centroids, mean cosine of a sample's student row with its own teacher row and with others'),
and whether the student's own features and logits still vary across images (on 256 training images).
Reads ``checkpoints/last.pt`` of CRD runs (``weights_only``), the exported student and the training set.
Run:  python benchmarks/crd_banks.py runs/demo-sokd/crd-seed0 [more run dirs; other methods' runs give the
      student line alone, for comparison]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from kdkit.config import load_config
from kdkit.data.augment import BatchAugment
from kdkit.deploy.export import load_student
from kdkit.engine.build import DataCache


def knn_accuracy(bank: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Leave-one-out k-NN (cosine) accuracy of the bank's rows on ``labels``."""
    sims = bank @ bank.t()
    sims.fill_diagonal_(-2.0)
    votes = F.one_hot(labels[sims.topk(k, dim=1).indices], int(labels.max()) + 1).sum(1)
    return float((votes.argmax(1) == labels).float().mean())


def centroid_accuracy(bank: torch.Tensor, labels: torch.Tensor) -> float:
    centroids = torch.stack([bank[labels == c].mean(0) for c in range(int(labels.max()) + 1)])
    return float(((bank @ centroids.t()).argmax(1) == labels).float().mean())


def describe(run: Path) -> list[str]:
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["terms"]
    config = load_config(run / "config.yaml", ["teacher.weights=null"])
    data = DataCache().train(config.data)
    banks = [k for k in state if k.endswith("memory_s")]
    if not banks:  # another method's run: its student alone, for comparison
        return [f"## {run} (no CRD banks)", "", student_outputs(run, data), ""]
    student = state[banks[0]]
    teacher = next(v for k, v in state.items() if k.endswith("memory_t"))
    labels = data.labels.long()
    lines = [f"## {run}", ""]
    for name, bank in (("student bank", student), ("teacher bank", teacher)):
        lines.append(
            f"- {name}: mean cosine between samples {float((bank @ bank.t()).mean()):.3f}, 5-NN accuracy "
            f"{100 * knn_accuracy(bank, labels):.1f} %, nearest-centroid accuracy "
            f"{100 * centroid_accuracy(bank, labels):.1f} %"
        )
    s_mean, t_mean = F.normalize(student.mean(0), dim=0), F.normalize(teacher.mean(0), dim=0)
    own = float((student * teacher).sum(1).mean())
    others = float((student @ teacher[:2000].t()).mean())
    lines += [
        f"- cosine of the banks' centroids {float(s_mean @ t_mean):.3f}; a sample's student row against "
        f"its own teacher row {own:.3f}, against other samples' {others:.3f}",
        student_outputs(run, data),
        "",
    ]
    return lines


@torch.no_grad()
def student_outputs(run: Path, data, count: int = 256) -> str:
    """Mean norm of the student's pooled embedding (its classifier's input) and the std of its logits
    across ``count`` training images."""
    model, spec = load_student(run)
    images = torch.stack([data[i][0] for i in range(min(count, len(data)))])
    seen = {}
    classifier = model.get_submodule(model.embedding_tap.split(":")[0])
    hook = classifier.register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0]))  # returns None
    logits = model(BatchAugment(0, False, spec.mean, spec.std).normalize(images))
    hook.remove()
    return (
        f"- student on {len(images)} training images: pooled embedding mean norm "
        f"{float(seen['x'].flatten(1).norm(dim=1).mean()):.2f}, logit std across images "
        f"{float(logits.std(0).mean()):.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args()
    for run in args.runs:
        print("\n".join(describe(run)))


if __name__ == "__main__":
    main()
