"""Per-sample random draws: a sample's augmentation depends on ``(seed, stage, epoch, dataset index)`` only.

Every random parameter of sample ``i`` comes from a hash of ``(*base, i)`` (BLAKE2b, one call per
sample), never from a generator shared by the batch. So the augmented image of sample ``i`` in epoch
``e`` is the same whatever the batch size, its position in the batch and the number of processes,
and it can be recomputed anywhere (FKD / TinyViT store a teacher's outputs per sample and
augmentation and replay them; :mod:`kdkit.engine.teacher_cache` does).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SampleKeys:
    """The random streams of one batch: row ``j`` belongs to dataset sample ``indices[j]``."""

    base: tuple[object, ...]
    indices: Tensor

    def uniform(self, count: int) -> Tensor:
        """``[B, count]`` float64 uniforms in [0, 1): sample ``j``'s first ``count`` draws (53 bits each;
        past 8 draws, blocks of 8 from the hash of ``(*base, i, block)``)."""
        rows = []
        for index in self.indices.tolist():
            row: list[int] = []
            for block in range(-(-count // 8)):
                n = min(count - 8 * block, 8)
                key = (*self.base, int(index)) if block == 0 else (*self.base, int(index), block)
                digest = hashlib.blake2b(repr(key).encode(), digest_size=8 * n).digest()
                row += [int.from_bytes(digest[8 * k : 8 * k + 8], "little") >> 11 for k in range(n)]
            rows.append(row)
        return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), count) / float(1 << 53)

    def seeds(self) -> list[int]:
        """One 63-bit seed per sample, for libraries that draw from a seeded global RNG (torchvision)."""
        return [
            int.from_bytes(
                hashlib.blake2b(repr((*self.base, int(i))).encode(), digest_size=8).digest(), "little"
            )
            >> 1
            for i in self.indices.tolist()
        ]

    def __len__(self) -> int:
        return len(self.indices)


def sample_keys(indices: Tensor | list[int], *base: object) -> SampleKeys:
    """The keys of the samples ``indices`` under ``base`` (the trainer's base: ``("augment", seed, stage,
    epoch)``)."""
    return SampleKeys(tuple(base), torch.as_tensor(indices, dtype=torch.long).cpu())
